"""A user's torchrun script whose rank 1 resumed one epoch ahead of rank 0 and passes its own count to a
``Checkpointer(every_n_epochs=2)``: the save is due on one rank only. Every rank prints what it was told.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.ranks_apart fsdp|ddp
"""

from __future__ import annotations

import sys

import tracking
from tests.distributed import tiny_job


def main(strategy: str) -> None:
    model, optimizer, rank = tiny_job.start(strategy)
    try:
        with tracking.Checkpointer(every_n_epochs=2) as checkpoints:
            for epoch in range(4):
                tiny_job.step(model, optimizer)  # the strategy's collectives: a rank left in a save blocks them
                checkpoints.save(model, optimizer, epoch=epoch + rank)
    except ValueError as exc:
        tiny_job.say(f"rank {rank} refused: {exc}")
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1])
