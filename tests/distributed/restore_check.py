"""Restore a run's checkpoint into an FSDP2-sharded DigitsMLP on every rank of a torchrun job, then save
the full model and optimizer state (gathered) and this rank's ``rank_state`` where the test can read them.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.restore_check RUN_ID EPOCH OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import tracking
from pipelines import digits
from pipelines.models import DigitsMLP


def main(run_id: str, epoch: int, out: Path) -> None:
    dist.init_process_group("gloo")
    try:
        model = DigitsMLP(64, hidden=digits.HIDDEN, dropout=digits.DROPOUT)
        fully_shard(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1.0)  # the checkpoint's lr replaces it
        scheduler = digits._step_lr(optimizer)
        loaded = tracking.restore(run_id, model, optimizer, scheduler, checkpoint=epoch)
        options = StateDictOptions(full_state_dict=True)  # gathered on every rank (cpu_offload: rank 0 only)
        full = {
            "model_state": get_model_state_dict(model, options=options),
            "optim_state": get_optimizer_state_dict(model, optimizer, options=options),
            "epoch": loaded.epoch,
            "rank_state": loaded.rank_state,
        }
        torch.save(full, out / f"rank{dist.get_rank()}-of-{dist.get_world_size()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
