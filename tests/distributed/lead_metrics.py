"""A user's torchrun script that validates on rank 0 alone, so only rank 0 has the metrics it saves with,
keeping the best checkpoint by them.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.lead_metrics fsdp|ddp
"""

from __future__ import annotations

import sys

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import tracking

VAL_LOSSES = (0.5, 0.2, 0.9)


def main(strategy: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if strategy == "fsdp":
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters())
    rank = dist.get_rank()
    if rank == 0:
        print("MLflow run", mlflow.start_run().info.run_id, flush=True)
    with tracking.Checkpointer(keep_last=1, keep_best=1) as checkpointer:
        for epoch, val_loss in enumerate(VAL_LOSSES, start=1):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            checkpointer.save(model, optimizer, epoch=epoch, metrics={"val_loss": val_loss} if rank == 0 else None)
    dist.destroy_process_group()
    if rank == 0:
        mlflow.end_run()


if __name__ == "__main__":
    main(sys.argv[1])
