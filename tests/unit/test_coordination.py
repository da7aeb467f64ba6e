"""The gloo group ranks coordinate checkpoints on: it outlasts a long synchronous upload, and goes at exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tracking.parallel import distributed


def test_the_coordination_group_waits_longer_than_torchs_default(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        default = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        coordination = distributed.group()._get_backend(torch.device("cpu")).options._timeout
        # Rank 0 may upload for hours while the other ranks wait in this group; torch's default is 30 min.
        assert coordination == distributed.COORDINATION_TIMEOUT > default
    finally:
        distributed.release()
        dist.destroy_process_group()


EXIT_SCRIPT = """
import atexit, sys, tempfile, torch.distributed as dist
from tracking.parallel import distributed

store = tempfile.mktemp()
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
# Registered before the coordination group is made, as Lightning registers its destroy_process_group
# when it starts the process group: atexit runs it after the library's own handler.
atexit.register(lambda: print("left at exit:", len(distributed._groups), dist.is_initialized(), flush=True))
distributed.group()
"""


def test_the_coordination_group_is_destroyed_at_exit_before_the_default_group() -> None:
    # A gloo group left to the interpreter's teardown can abort a rank of a finished torchrun job.
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "left at exit: 0 True" in done.stdout, done.stdout + done.stderr[-2000:]
