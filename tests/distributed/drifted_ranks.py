"""A user's torchrun script whose ranks' step counters drift apart after their first save call: rank 1 counts one
step more, so that a ``Checkpointer(every_n_steps=2)`` save is due on rank 1 only, and rank 1 waits in it for rank 0.
Rank 1 prints the warning it logs while it waits; rank 0 then makes the same save (as a rank that is only slower
does), so the job ends.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.drifted_ranks DIR
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import tracking
from tests.distributed import tiny_job
from tracking.parallel import distributed

# How long rank 0 looks for rank 1's warning before it makes the save anyway (the job ends either way).
LOOK_S = 30.0


class Seen(logging.Handler):
    """Prints each warning of the library's collectives, and leaves ``flag`` for the other rank to find."""

    def __init__(self, flag: Path) -> None:
        super().__init__(logging.WARNING)
        self.flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        tiny_job.say(record.getMessage())
        self.flag.touch()


def main(folder: str) -> None:
    distributed.ARRIVAL_WARNING_S = 1.0  # 60 s in a real job
    flag = Path(folder) / "rank-1-warned"
    model, optimizer, rank = tiny_job.start("ddp")
    with tracking.Checkpointer(every_n_steps=2) as checkpoints:
        tiny_job.step(model, optimizer)
        checkpoints.save(model, optimizer, epoch=0, step=1)  # the first call, keys compared: not due anywhere
        if rank == 1:
            logging.getLogger(distributed.__name__).addHandler(Seen(flag))
            # A batch skipped on this rank, counted all the same: step 2 is due here, and here only.
            checkpoints.save(model, optimizer, epoch=0, step=2)
        else:
            for _ in range(int(LOOK_S / 0.1)):
                if flag.exists():
                    break
                time.sleep(0.1)
            tiny_job.say(f"rank 0 saw rank 1's warning: {flag.exists()}")
            checkpoints.save(model, optimizer, epoch=0, step=2)
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1])
