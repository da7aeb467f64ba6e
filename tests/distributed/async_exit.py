"""A user's torchrun script that saves in the background and ends as PyTorch's examples end: it destroys
the process group right after its last save, without waiting for it.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.async_exit fsdp|ddp EPOCHS [imported]

``imported``: through the name ``from torch.distributed import destroy_process_group`` bound at import,
as PyTorch's DDP tutorial does, which the library cannot make wait.
"""

from __future__ import annotations

import sys

import mlflow
import torch.distributed as dist
from torch.distributed import destroy_process_group

import tracking
from tests.distributed import tiny_job


def main(strategy: str, epochs: int, imported: bool) -> None:
    model, optimizer, rank = tiny_job.start(strategy)
    checkpointer = tracking.Checkpointer(async_save=True)
    for epoch in range(1, epochs + 1):
        tiny_job.step(model, optimizer)
        checkpointer.save(model, optimizer, epoch=epoch)
    (destroy_process_group if imported else dist.destroy_process_group)()
    if rank == 0:
        mlflow.end_run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["imported"])
