"""A Lightning DDP fit (2 CPU ranks, gloo) with MLflowCheckpoints, for torchrun:

    torchrun --standalone --nproc-per-node=2 -m tests.distributed.lightning_ddp RUN_ID [--fail] [--steps]
        [--sanity] [--resume] [--straight] [--rank-seeds] [--resume-from RUN_ID:STEP]

Lightning sees torchrun's environment and runs one rank per process. ``--fail`` makes rank 0's
upload fail: every rank must raise, none may hang at Lightning's barrier. ``--steps``: the
ModelCheckpoint keeps the last two saves of every 2 steps (2 batches an epoch on each rank) instead
of the best two epochs by ``val_loss``. ``--sanity``: Lightning's sanity check runs (two validation
batches) and each rank prints how many validation steps it ran. ``--resume``: the fit resumes from the
run's latest checkpoint and trains to epoch 4; ``--straight`` trains to epoch 4 from the start.
``--rank-seeds``: each rank seeds its global torch RNG (dropout) with a seed of its own. ``--resume-from
RUN_ID:STEP``: as ``--resume``, from that run's checkpoint of that global step (saved by ``--steps``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import tracking
from tests.lightning_model import TinyLit, loaders
from tracking.integrations.lightning import MLflowCheckpoints, checkpoint_path, mirror


class ValidationCounts(TinyLit):
    """Counts the validation steps its rank ran."""

    def __init__(self) -> None:
        super().__init__()
        self.validated = 0
        self.rank_seeds = False

    def setup(self, stage: str) -> None:
        # Once the strategy reseeded every rank alike (from PL_GLOBAL_SEED, which the samplers' seed stays) and
        # before a resumed fit restores the checkpoint.
        if self.rank_seeds:
            torch.manual_seed(1000 + self.global_rank)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validated += 1
        super().validation_step(batch, batch_idx)


def main(argv: list[str]) -> int:
    run_id = argv[0]
    fail, steps, sanity, resume, straight, rank_seeds = (
        flag in argv for flag in ("--fail", "--steps", "--sanity", "--resume", "--straight", "--rank-seeds")
    )
    source: tuple[str, Any] = (run_id, "latest")
    if "--resume-from" in argv:
        named, step = argv[argv.index("--resume-from") + 1].split(":")
        source, resume = (named, int(step)), True
    if fail:

        def refuse(*args: object, **kwargs: object) -> object:
            raise tracking.StorageError("the store refused the upload (test)")

        mirror.commit_local_files = refuse  # type: ignore[attr-defined,assignment]
    pl.seed_everything(0, verbose=False)
    checkpoints = (
        ModelCheckpoint(every_n_train_steps=2, save_top_k=2, monitor="step", mode="max")
        if steps
        else ModelCheckpoint(save_top_k=2, monitor="val_loss")
    )
    trainer = pl.Trainer(
        max_epochs=4 if resume or straight else 3,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        callbacks=[checkpoints, MLflowCheckpoints(run_id=run_id)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2 if sanity else 0,
        default_root_dir=f"/tmp/lightning-ddp-{run_id}",
    )
    module = ValidationCounts()
    module.rank_seeds = rank_seeds
    # Each rank its own download: the default folder is one per logged model, shared by the ranks of one machine.
    download = f"/tmp/lightning-ddp-{run_id}/rank-{os.environ['RANK']}"
    ckpt_path = checkpoint_path(*source, to=download) if resume else None
    try:
        trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    except tracking.TrackingError as exc:
        print(f"rank {trainer.global_rank}: raised {type(exc).__name__}: {exc}", flush=True)
        return 3
    finally:
        if sanity:
            print(f"rank {trainer.global_rank}: validated {module.validated}", flush=True)
    print(f"rank {trainer.global_rank}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
