"""A user's torchrun script that validates on rank 0 alone, so only rank 0 has the metrics it saves with,
keeping the best checkpoint by them.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.lead_metrics fsdp|ddp
"""

from __future__ import annotations

import sys

import tracking
from tests.distributed import tiny_job

VAL_LOSSES = (0.5, 0.2, 0.9)


def main(strategy: str) -> None:
    model, optimizer, rank = tiny_job.start(strategy)
    with tracking.Checkpointer(keep_last=1, keep_best=1) as checkpointer:
        for epoch, val_loss in enumerate(VAL_LOSSES, start=1):
            tiny_job.step(model, optimizer)
            checkpointer.save(model, optimizer, epoch=epoch, metrics={"val_loss": val_loss} if rank == 0 else None)
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1])
