"""A user's torchrun script whose rank 1 reaches a save seconds after rank 0 (as a save under ``if rank == 0:``
never does): rank 0 says, while it waits, why the other ranks may never come, and the save then goes on.
A second save, reached together, says nothing.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.late_rank fsdp|ddp
"""

from __future__ import annotations

import sys
import time

import tracking
from tests.distributed import tiny_job
from tracking.parallel import distributed


def main(strategy: str) -> None:
    distributed.ARRIVAL_WARNING_S = 1.0  # 60 s in a real job
    model, optimizer, rank = tiny_job.start(strategy)
    tiny_job.step(model, optimizer)
    if rank == 1:
        time.sleep(5)
    tracking.log_checkpoint(model, optimizer, epoch=1)
    tiny_job.step(model, optimizer)
    tracking.log_checkpoint(model, optimizer, epoch=2)
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1])
