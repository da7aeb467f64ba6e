"""Lightning fits of other schedules resumed by run ID, each against the fit that never stopped: saves after a
validation on the epoch's last batch, and gradient accumulation with a per-step LR schedule under bf16 autocast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import tracking
from tests.lightning_model import TinyLit, loaders, trainer
from tests.unit.test_lightning import assert_same_training
from tracking.integrations.lightning import MLflowCheckpoints, checkpoint_path


class OneCycleLit(TinyLit):
    """TinyLit with an LR schedule stepped at every optimizer step (``interval: "step"``)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.schedule(optimizer), "interval": "step"}}

    @staticmethod
    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=40)


def fit(folder: Path, epochs: int, module: type[TinyLit], ckpt_path: str | None = None, **settings: Any) -> Any:
    pl.seed_everything(0, verbose=False)
    model = module()
    saving = ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=-1)
    fitted = trainer(epochs, folder, [saving, MLflowCheckpoints()], **settings)
    fitted.fit(model, *loaders(resumable=True), ckpt_path=ckpt_path)
    return model, fitted


def resumed_as_straight(tmp_path: Path, module: type[TinyLit], stop: int, epochs: int, **settings: Any) -> str:
    """A fit of ``epochs`` against one stopped after ``stop`` epochs and resumed by run ID to ``epochs``: the run."""
    with mlflow.start_run():
        straight, straight_trainer = fit(tmp_path / "straight", epochs, module, **settings)
    with mlflow.start_run() as run:
        fit(tmp_path / "first", stop, module, **settings)
    run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id):
        path = checkpoint_path(run_id, to=tmp_path / "download")
        resumed, resumed_trainer = fit(tmp_path / "second", epochs, module, ckpt_path=path, **settings)
    assert resumed_trainer.global_step == straight_trainer.global_step
    assert_same_training(straight, straight_trainer, resumed, resumed_trainer)
    return str(run_id)


@pytest.mark.parametrize(
    "validating",
    [{"val_check_interval": 0.5}, {"check_val_every_n_epoch": 2}],
    ids=["twice-an-epoch", "every-second-epoch"],
)
def test_a_save_after_a_validation_on_the_epochs_last_batch_resumes_as_the_straight_fit(
    s3_experiment: str, tmp_path: Path, validating: dict[str, Any]
) -> None:
    # ModelCheckpoint saves at the validation's end, before Lightning ends the epoch: the resumed fit ends that epoch
    # on the data iterator it made as it started, then makes the next epoch's. The RNG it restored was drawn from
    # for the first: the next epoch's shuffle seed and dropout masks were not the straight fit's.
    resumed_as_straight(tmp_path, TinyLit, 2, 4, **validating)


def test_accumulated_gradients_a_per_step_schedule_and_bf16_resume_as_the_straight_fit(
    s3_experiment: str, tmp_path: Path
) -> None:
    run_id = resumed_as_straight(
        tmp_path, OneCycleLit, 1, 2, accumulate_grad_batches=3, precision="bf16-mixed", val_check_interval=0.5
    )
    # 4 batches an epoch, an optimizer step every 3 and at the epoch's last; a validation that finds no new step saves
    # nothing, so a save is never made mid-accumulation here.
    assert [c.step for c in tracking.list_checkpoints(run_id)] == [2, 4]
    # OneCycleLR's arguments are not all kept on it: a factory gets it back with its state (4 steps taken).
    loaded = tracking.load(run_id, mode="train", scheduler=OneCycleLit.schedule)
    assert isinstance(loaded.scheduler, torch.optim.lr_scheduler.OneCycleLR) and loaded.scheduler.last_epoch == 4
