"""A Lightning DDP fit (2 CPU ranks, gloo) with MLflowCheckpoints, for torchrun:

    torchrun --standalone --nproc-per-node=2 -m tests.distributed.lightning_ddp RUN_ID [--fail] [--steps]

Lightning sees torchrun's environment and runs one rank per process. ``--fail`` makes rank 0's
upload fail: every rank must raise, none may hang at Lightning's barrier. ``--steps``: the
ModelCheckpoint keeps the last two saves of every 2 steps (2 batches an epoch on each rank) instead
of the best two epochs by ``val_loss``.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

import tracking
from tests.lightning_model import TinyLit, loaders
from tracking.integrations.lightning import MLflowCheckpoints, mirror


def main(argv: list[str]) -> int:
    run_id, fail, steps = argv[0], "--fail" in argv, "--steps" in argv
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
        max_epochs=3,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        callbacks=[checkpoints, MLflowCheckpoints(run_id=run_id)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=f"/tmp/lightning-ddp-{run_id}",
    )
    try:
        trainer.fit(TinyLit(), *loaders())
    except tracking.TrackingError as exc:
        print(f"rank {trainer.global_rank}: raised {type(exc).__name__}: {exc}", flush=True)
        return 3
    print(f"rank {trainer.global_rank}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
