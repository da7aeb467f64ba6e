"""Run a script as the ranks of a small gloo job: one process per rank, rendezvous through a file in tmp_path.

What torchrun does, without its agent: a rank that hangs is found by the time limit, not by torchrun
killing the job once another rank exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]

# What each script starts with: the process group, and a small model sharded by FSDP2 with its Adam, trained a step.
PREAMBLE = """
import os, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=world)
args = sys.argv[4:]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
fully_shard(model)
optimizer = torch.optim.Adam(model.parameters())
model(torch.randn(16, 4)).pow(2).mean().backward()
optimizer.step()


def say(line):
    os.write(1, f"rank {rank}: {line}\\n".encode())  # one write: the ranks share the terminal
"""


def run_ranks(
    script: str, world: int, tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> list[str]:
    """Each rank's stdout, in rank order, once every rank exited 0; fails the test when one did not, or when
    any still runs after ``timeout`` seconds (a rank left waiting on a collective: they are all killed).
    ``env``: variables to set in the ranks' environment over this process's."""
    rendezvous = tmp_path / f"rendezvous-{len(list(tmp_path.glob('rendezvous-*')))}"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", PREAMBLE + script, str(rank), str(world), str(rendezvous), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for rank, process in enumerate(ranks):
            try:
                out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank {rank} still runs after {timeout} s: a rank waits for the others") from None
            assert process.returncode == 0, f"rank {rank} exited {process.returncode}:\n{out}\n{err[-3000:]}"
            outputs.append(out)
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    return outputs
