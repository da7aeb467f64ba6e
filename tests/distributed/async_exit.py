"""A user's torchrun script that saves in the background and ends as PyTorch's examples end: it destroys
the process group right after its last save, without waiting for it.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.async_exit fsdp|ddp EPOCHS [imported]

``imported``: through the name ``from torch.distributed import destroy_process_group`` bound at import,
as PyTorch's DDP tutorial does, which the library cannot make wait.
"""

from __future__ import annotations

import sys

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import destroy_process_group
from torch.distributed.fsdp import fully_shard

import tracking


def main(strategy: str, epochs: int, imported: bool) -> None:
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
    checkpointer = tracking.Checkpointer(async_save=True)
    for epoch in range(1, epochs + 1):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        checkpointer.save(model, optimizer, epoch=epoch)
    (destroy_process_group if imported else dist.destroy_process_group)()
    if rank == 0:
        mlflow.end_run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["imported"])
