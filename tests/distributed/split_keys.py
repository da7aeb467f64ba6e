"""A user's torchrun script whose ranks count epochs apart and pass different ``epoch=`` to one collective
``log_checkpoint``, then the same one: every rank prints what it was told.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.split_keys fsdp|ddp
"""

from __future__ import annotations

import sys

import tracking
from tests.distributed import tiny_job


def main(strategy: str) -> None:
    model, optimizer, rank = tiny_job.start(strategy)
    tiny_job.step(model, optimizer)
    try:
        tracking.log_checkpoint(model, optimizer, epoch=1 + rank)
    except ValueError as exc:
        tiny_job.say(f"rank {rank} refused: {exc}")
    # The group is still in step: a save with the same key on every rank goes on.
    tracking.log_checkpoint(model, optimizer, epoch=5)
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1])
