"""What the small user scripts of this folder start with: a process group, a tiny model wrapped as the
strategy says, its Adam, and (on rank 0) the MLflow run, whose ID rank 0 prints for the test to read."""

from __future__ import annotations

import os

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard


def start(strategy: str) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """``strategy``: ``fsdp`` (FSDP2 ``fully_shard``) or ``ddp``. Returns the model, its optimizer and this rank."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if strategy == "fsdp":
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    rank = dist.get_rank()
    if rank == 0:
        say(f"MLflow run {mlflow.start_run().info.run_id}")
    return model, torch.optim.Adam(model.parameters()), rank


def say(line: str) -> None:
    """Print ``line`` in one write. The ranks share torchrun's stdout, and ``print`` writes the text and its newline
    apart: two ranks' lines printed at once can run into one line."""
    os.write(1, (line + "\n").encode())


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One training step on random data."""
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def finish(rank: int) -> None:
    """End the job as a user's script does: the process group, then (on rank 0) the MLflow run."""
    dist.destroy_process_group()
    if rank == 0:
        mlflow.end_run()
