"""The Lightning integration over a real run (moto S3 + sqlite): an in-process Trainer, its checkpoints
mirrored as logged models, retention, pointers, loading, exact resume by run ID, the CLI, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from click.testing import CliRunner
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from mlflow import MlflowClient
from torch import nn

import tracking
from tests.lightning_model import TinyLit, fit, loaders, trainer
from tracking import layout
from tracking.cli import main
from tracking.integrations import lightning as integration
from tracking.integrations.lightning import MLflowCheckpoints, checkpoint_path, mirror
from tracking.integrations.lightning.description import metric_key
from tracking.metrics import renamed


def _tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def _paths(model_id: str) -> list[str]:
    return sorted(json.loads(MlflowClient().get_logged_model(model_id).tags[integration.TAG_PATHS]))


def test_every_save_is_a_logged_model_with_metrics_epoch_and_step(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path, save_top_k=-1, monitor="val_loss", save_last=True)
    run_id = run.info.run_id
    saved = tracking.list_checkpoints(run_id)
    # Lightning's own epoch numbers and global steps, as in its file names: epoch=1-step=8.ckpt.
    assert [(c.epoch, c.step) for c in saved] == [(0, 4), (1, 8), (2, 12)]
    for checkpoint in saved:
        assert checkpoint.manifest.format == "lightning"
        assert checkpoint.manifest.model["class"] == "tests.lightning_model:TinyLit"
        assert checkpoint.manifest.model["init_kwargs"] == {"hidden": 16, "lr": 0.01}
        assert checkpoint.manifest.optimizer is not None and checkpoint.manifest.optimizer["class"].endswith("Adam")
        assert set(checkpoint.metrics) >= {"val_loss", "train_loss"}
        assert all(isinstance(v, float) for v in checkpoint.metrics.values())
    # last.ckpt of epoch 2 is the same checkpoint as epoch=2-step=12.ckpt: no second upload.
    assert _paths(str(saved[-1].model_id)) == sorted(
        [str(tmp_path / "checkpoints" / "epoch=2-step=12.ckpt"), str(tmp_path / "checkpoints" / "last.ckpt")]
    )
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 3
    tags = _tags(run_id)
    best = min(saved, key=lambda c: c.metrics["val_loss"])
    assert tags[layout.TAG_LATEST] == saved[-1].model_id
    assert (tags[layout.TAG_BEST], tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == (
        best.model_id,
        "val_loss",
        "min",
    )
    # The run's description says how to load and resume it.
    description = tags["mlflow.note.content"]
    assert f'tracking.load("{run_id}")' in description and "checkpoint_path" in description


def test_save_top_k_retention_is_mirrored_and_pointers_follow(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(5, tmp_path, save_top_k=2, monitor="train_loss", mode="max")
    run_id = run.info.run_id
    on_disk = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(on_disk) == 2
    saved = tracking.list_checkpoints(run_id)
    assert sorted(os.path.basename(p) for c in saved for p in _paths(str(c.model_id))) == on_disk
    # Deleted ones are gone from MLflow altogether (no READY, PENDING or FAILED leftovers).
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 2
    tags = _tags(run_id)
    best = max(saved, key=lambda c: c.metrics["train_loss"])
    assert tags[layout.TAG_BEST] == best.model_id and tags[layout.TAG_MODE] == "max"
    assert tags[layout.TAG_LATEST] in {c.model_id for c in saved}
    assert tracking.find_checkpoint(run_id, "best").model_id == best.model_id


def test_a_resumed_fit_removes_the_earlier_fits_checkpoints_as_its_model_checkpoint_does(
    s3_experiment: str, tmp_path: Path
) -> None:
    keep_last = {"save_top_k": 2, "monitor": "step", "mode": "max"}
    with mlflow.start_run() as run:
        fit(3, tmp_path, **keep_last)
    run_id = run.info.run_id
    first = {c.model_id for c in tracking.list_checkpoints(run_id)}
    with mlflow.start_run(run_id=run_id):
        fit(5, tmp_path, ckpt_path=checkpoint_path(run_id, to=tmp_path / "download"), **keep_last)
    saved = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in saved] == [3, 4] and first.isdisjoint(c.model_id for c in saved)
    assert sorted(os.path.basename(p) for c in saved for p in _paths(str(c.model_id))) == sorted(
        p.name for p in (tmp_path / "checkpoints").iterdir()
    )
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 2


@pytest.mark.parametrize(
    "shared", [pytest.param(False, id="own-folders"), pytest.param(True, id="one-folder", marks=pytest.mark.slow)]
)
def test_resumed_fits_with_two_model_checkpoints_keep_what_each_one_keeps(
    s3_experiment: str, tmp_path: Path, shared: bool
) -> None:
    # At a step both save, the file written first is the logged model, and the other ModelCheckpoint's state
    # in it lacks its own save there: resumed from it, it kept that save's file (and model) for good.
    last, best = (tmp_path / "ckpts", tmp_path / "ckpts") if shared else (tmp_path / "last", tmp_path / "best")

    def fit_two(epochs: int, ckpt_path: str | None = None) -> None:
        pl.seed_everything(0, verbose=False)
        callbacks = [
            ModelCheckpoint(dirpath=last, save_top_k=2, monitor="step", mode="max"),
            ModelCheckpoint(dirpath=best, filename="best-{epoch}-{step}", save_top_k=1, monitor="val_loss"),
            MLflowCheckpoints(monitor="val_loss"),
        ]
        trainer(epochs, tmp_path, callbacks).fit(TinyLit(), *loaders(), ckpt_path=ckpt_path)

    with mlflow.start_run() as run:
        fit_two(2)
    run_id = run.info.run_id
    for epochs in (3, 4):
        with mlflow.start_run(run_id=run_id):
            fit_two(epochs, ckpt_path=checkpoint_path(run_id, to=tmp_path / f"download-{epochs}"))

    on_disk = sorted(path.name for folder in {last, best} for path in folder.iterdir())
    assert [name for name in on_disk if name.startswith("best-")] == ["best-epoch=3-step=16.ckpt"]
    assert len(on_disk) == 3  # and the last two
    saved = tracking.list_checkpoints(run_id)
    assert sorted(os.path.basename(p) for c in saved for p in _paths(str(c.model_id))) == on_disk
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == len(saved) == 2


def test_under_ddp_every_rank_resumes_the_model_checkpoint_states_rank_0_took(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 0 alone knows the files it wrote, and took the best ModelCheckpoint's state from the last one; rank 1 kept
    # the stale state (no save of its own), so at the next validation it saved alone while rank 0 waited in
    # check_monitor_top_k's collective. Rank 1 of two, in this process: rank 0's steps (on_rank0) run here too.
    from tracking.integrations.lightning.mirror import MirrorIO
    from tracking.parallel import distributed

    last, best = tmp_path / "last", tmp_path / "best"

    def fit_two(epochs: int, ckpt_path: str | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        callbacks = [
            ModelCheckpoint(dirpath=last, save_top_k=2, monitor="step", mode="max"),
            ModelCheckpoint(dirpath=best, filename="best-{epoch}-{step}", save_top_k=1, monitor="val_loss"),
            MLflowCheckpoints(monitor="val_loss"),
        ]
        fitted = trainer(epochs, tmp_path, callbacks)
        fitted.fit(TinyLit(), *loaders(), ckpt_path=ckpt_path)
        return fitted

    with mlflow.start_run() as run:
        fit_two(2)
    run_id = run.info.run_id
    path = checkpoint_path(run_id, to=tmp_path / "download")

    current = [1]
    paths_of = MirrorIO.paths_of

    def on_rank0(step: Any, **kwargs: Any) -> Any:
        current[0] = 0
        try:
            return step()
        finally:
            current[0] = 1

    def raise_together(error: BaseException | None) -> None:
        if error is not None:
            raise error

    monkeypatch.setattr(MirrorIO, "paths_of", lambda io, *key: paths_of(io, *key) if current[0] == 0 else set())
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "prepare", lambda: None)
    monkeypatch.setattr(distributed, "rank", lambda: current[0])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "on_rank0", on_rank0)
    monkeypatch.setattr(distributed, "raise_together", raise_together)
    monkeypatch.setattr(distributed, "gather", lambda value, **kwargs: [value, value])
    with mlflow.start_run(run_id=run_id):
        resumed = fit_two(2, ckpt_path=path)  # restored, not trained: the states as the resumed fit has them
    best_kept = next(c for c in resumed.checkpoint_callbacks if c.dirpath == str(best))
    assert sorted(os.path.basename(p) for p in best_kept.best_k_models) == ["best-epoch=1-step=8.ckpt"]


def test_default_checkpoint_keeps_only_the_latest(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path)  # ModelCheckpoint's default: save_top_k=1, no monitor: the newest file only
    saved = tracking.list_checkpoints(run.info.run_id)
    assert [c.epoch for c in saved] == [2]
    assert _tags(run.info.run_id)[layout.TAG_LATEST] == saved[0].model_id


def test_load_returns_the_module_in_eval_mode_with_its_optimizer_state(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        model, fitted = fit(2, tmp_path, save_top_k=-1)
    loaded = tracking.load(run.info.run_id)
    assert isinstance(loaded.model, TinyLit) and not loaded.model.training
    assert loaded.model.hparams == {"hidden": 16, "lr": 0.01}
    assert (loaded.epoch, loaded.step) == (1, 8)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert isinstance(loaded.optimizer, torch.optim.Adam)
    live, restored = fitted.optimizers[0].state_dict(), loaded.optimizer.state_dict()
    for index, entry in live["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert isinstance(loaded.scheduler, torch.optim.lr_scheduler.StepLR)
    assert loaded.scheduler.state_dict() == fitted.lr_scheduler_configs[0].scheduler.state_dict()
    assert "loops" in loaded.extra and "hyper_parameters" in loaded.extra


def test_load_model_and_load_state_dict_read_the_modules_weights(s3_experiment: str, tmp_path: Path) -> None:
    # Both read the checkpoint's "model_state", which a Lightning checkpoint calls "state_dict": a KeyError.
    with mlflow.start_run() as run:
        model, _ = fit(1, tmp_path)
    built = tracking.load_model(run.info.run_id)
    weights = tracking.load_state_dict(run.info.run_id)
    assert isinstance(built, TinyLit) and not built.training
    for name, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[name], value) and torch.equal(weights[name], value), name


class RecordingLogger(MLFlowLogger):
    """Lightning's MLflow logger, noting the steps it logs each metric at."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: dict[str, set[int]] = {}

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        for key in metrics:
            self.steps.setdefault(key, set()).add(step or 0)
        super().log_metrics(metrics, step)


def test_resume_by_run_id_matches_a_straight_run_bit_for_bit(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run():
        straight, straight_trainer = fit(8, tmp_path / "straight", save_top_k=-1)
    logger = RecordingLogger(experiment_name="unit-s3", tracking_uri=mlflow.get_tracking_uri())
    fit(4, tmp_path / "first", save_top_k=-1, logger=logger)
    run_id = str(logger.run_id)
    path = checkpoint_path(run_id, to=tmp_path / "download")
    assert torch.load(path, weights_only=True)["epoch"] == 3
    resumed_logger = RecordingLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())
    resumed, resumed_trainer = fit(8, tmp_path / "second", save_top_k=-1, ckpt_path=path, logger=resumed_logger)
    assert_same_training(straight, straight_trainer, resumed, resumed_trainer)
    # One run holds both halves: epochs 0..7, and the resumed fit's metrics.
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == list(range(8))
    # Lightning's logger logged both halves' metrics at its global steps (the last batch of epochs 3 and 7).
    steps = {m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")}
    assert {15, 31} <= steps
    # The checkpoints' metrics, the resumed fit's included, are charted at those same steps.
    assert steps == logger.steps["val_loss"] | resumed_logger.steps["val_loss"]


def test_restore_rng_false_leaves_the_rng_states_a_resumed_fit_finds() -> None:
    # A resumed fit always restored the checkpoint's RNG states: one reseeded to draw anew drew on from the old.
    saved = MLflowCheckpoints().state_dict()  # the RNG states a checkpoint keeps
    torch.manual_seed(5)
    reseeded = torch.get_rng_state()
    MLflowCheckpoints(restore_rng=False).load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), reseeded)
    MLflowCheckpoints().load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])


def test_under_ddp_each_rank_resumes_its_own_rng_states(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only rank 0's callback states are written: a resumed rank 1 drew rank 0's numbers from then on, so ranks seeded
    # apart (seed_everything(seed + rank)) drew the same dropout masks and augmentations.
    from tracking.parallel import distributed

    def state_of(seed: int) -> Any:
        torch.manual_seed(seed)
        return MLflowCheckpoints().state_dict()["rng"]

    ranks = [state_of(0), state_of(1)]  # what each rank's callback captures at the save
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather", lambda value, **kwargs: ranks)  # rank 0's view of the save
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    saved = MLflowCheckpoints().state_dict()  # what the file holds: rank 0's
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        torch.manual_seed(7)
        MLflowCheckpoints().load_state_dict(saved)
        assert torch.equal(torch.get_rng_state(), ranks[rank]["torch"]), f"rank {rank}"
    # Resumed on 3 ranks: each rank of a number the saving job had takes its states, the others rank 0's; said once.
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    warned: list[str] = []
    monkeypatch.setattr(distributed, "warn", lambda message, *args, **kwargs: warned.append(message))
    for rank, expected in [(1, ranks[1]), (2, saved["rng"])]:
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        MLflowCheckpoints().load_state_dict(saved)
        assert torch.equal(torch.get_rng_state(), expected["torch"]), f"rank {rank}"
    assert warned and "holds the RNG states of 2 ranks, this fit runs on 3" in warned[0]


def test_saves_by_step_are_keyed_by_step_and_each_one_stays(s3_experiment: str, tmp_path: Path) -> None:
    # 4 batches an epoch: a save every 3 steps lands mid-epoch, two in epoch 2 (steps 9 and 12).
    with mlflow.start_run() as run:
        fit(4, tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)
    run_id = run.info.run_id
    saved = tracking.list_checkpoints(run_id)
    assert [(c.epoch, c.step) for c in saved] == [(0, 3), (1, 6), (2, 9), (2, 12), (3, 15)]
    for checkpoint in saved:
        assert (checkpoint.keyed_by, checkpoint.key, checkpoint.manifest.keyed_by) == ("step", checkpoint.step, "step")
        name = MlflowClient().get_logged_model(str(checkpoint.model_id)).name
        assert name == f"checkpoint-step-{checkpoint.step:08d}", name
        file = torch.load(_paths(str(checkpoint.model_id))[0], weights_only=True)
        assert (file["epoch"], file["global_step"]) == (checkpoint.epoch, checkpoint.step)
    # last.ckpt, saved at step 15 too, is the same logged model.
    assert _paths(str(saved[-1].model_id)) == sorted(
        [str(tmp_path / "checkpoints" / "epoch=3-step=15.ckpt"), str(tmp_path / "checkpoints" / "last.ckpt")]
    )
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 5
    tags = _tags(run_id)
    assert (tags[layout.TAG_LATEST], tags[layout.TAG_LATEST_STEP]) == (saved[-1].model_id, "15")
    assert "step 15" in tags["mlflow.note.content"]


def test_a_fit_with_an_epoch_and_a_step_model_checkpoint_keys_by_step(s3_experiment: str, tmp_path: Path) -> None:
    # One ModelCheckpoint keeps the last 2 by step, the other the best by val_loss at each epoch's end: the
    # epoch's save at the step of a step save is that same logged model; a model goes once no kept file is it.
    by_step = ModelCheckpoint(
        dirpath=tmp_path / "steps", every_n_train_steps=2, save_top_k=2, monitor="step", mode="max"
    )
    by_epoch = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1)
    pl.seed_everything(0, verbose=False)
    with mlflow.start_run() as run:
        trainer(3, tmp_path, [by_step, by_epoch, MLflowCheckpoints(monitor="val_loss")]).fit(TinyLit(), *loaders())
    run_id = run.info.run_id
    saved = tracking.list_checkpoints(run_id)
    assert {c.keyed_by for c in saved} == {"step"}
    on_disk = {str(p) for folder in ("steps", "best") for p in (tmp_path / folder).iterdir()}
    assert {p for c in saved for p in _paths(str(c.model_id))} == on_disk
    assert [c.step for c in saved][-2:] == [10, 12]
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == len(saved)
    tags = _tags(run_id)
    assert (tags[layout.TAG_LATEST], tags[layout.TAG_LATEST_STEP]) == (saved[-1].model_id, "12")
    assert tags[layout.TAG_BEST] in {c.model_id for c in saved}


def test_save_top_k_by_step_deletes_the_removed_models(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path, every_n_train_steps=2, save_top_k=2, monitor="step", mode="max", save_last=True)
    run_id = run.info.run_id
    saved = tracking.list_checkpoints(run_id)
    assert [c.step for c in saved] == [10, 12]
    assert sorted(os.path.basename(p) for c in saved for p in _paths(str(c.model_id))) == sorted(
        p.name for p in (tmp_path / "checkpoints").iterdir()
    )
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 2
    assert _tags(run_id)[layout.TAG_LATEST] == saved[-1].model_id


def test_checkpoint_path_and_load_take_a_global_step_in_a_run_keyed_by_step(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        model, _ = fit(3, tmp_path, every_n_train_steps=3, save_top_k=-1, monitor="train_loss")
    run_id = run.info.run_id
    # 6 is a step (epoch 1, mid-epoch), not an epoch: the run is keyed by step.
    six = torch.load(checkpoint_path(run_id, 6, to=tmp_path / "six"), weights_only=True)
    assert (six["epoch"], six["global_step"]) == (1, 6)
    latest = torch.load(checkpoint_path(run_id, to=tmp_path / "latest"), weights_only=True)
    assert latest["global_step"] == 12
    best = tracking.find_checkpoint(run_id, "best")
    assert best.manifest.step in {6, 9, 12}  # train_loss is an epoch metric: the first save (step 3) has none
    assert (
        torch.load(checkpoint_path(run_id, "best", to=tmp_path / "b"), weights_only=True)["global_step"]
        == best.manifest.step
    )
    with pytest.raises(tracking.NotFoundError):
        checkpoint_path(run_id, 2, to=tmp_path / "none")  # epoch 2 holds steps 9 and 12, no step 2
    loaded = tracking.load(run_id)
    assert isinstance(loaded.model, TinyLit) and (loaded.epoch, loaded.step) == (2, 12)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert tracking.load(run_id, 6).step == 6


def test_resume_mid_epoch_by_run_id_matches_a_straight_run_bit_for_bit(s3_experiment: str, tmp_path: Path) -> None:
    # Lightning resumes a mid-epoch checkpoint at the next batch only with a resumable loader (a plain
    # DataLoader starts the epoch's data over: Lightning warns that the run will differ).
    saving = {"every_n_train_steps": 3, "save_top_k": -1, "resumable": True}
    with mlflow.start_run():
        straight, straight_trainer = fit(4, tmp_path / "straight", **saving)
    with mlflow.start_run() as run:
        fit(4, tmp_path / "first", max_steps=6, **saving)  # stops at step 6: epoch 1, batch 2 of 4
    run_id = run.info.run_id
    path = checkpoint_path(run_id, to=tmp_path / "download")
    assert (torch.load(path, weights_only=True)["epoch"], torch.load(path, weights_only=True)["global_step"]) == (1, 6)
    with mlflow.start_run(run_id=run_id):
        resumed, resumed_trainer = fit(4, tmp_path / "second", ckpt_path=path, **saving)
    assert resumed_trainer.global_step == straight_trainer.global_step == 16
    assert_same_training(straight, straight_trainer, resumed, resumed_trainer)
    assert [c.step for c in tracking.list_checkpoints(run_id)] == [3, 6, 9, 12, 15]


class StepLossLit(TinyLit):
    """TinyLit logging its loss at every step too (``train_loss_step``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=True)
        return loss


class Killed(Exception):
    pass


class KillAtStep(pl.Callback):
    """Kills the fit as the batch after global step ``step`` starts (as a crash or a preemption would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at global step {self.step}")


@pytest.mark.parametrize(
    ("killed_at", "validating"),
    [(4, {}), (2, {"val_check_interval": 2})],
    ids=["on-the-epochs-last-batch", "mid-epoch-before-a-validation"],
)
def test_resume_from_a_save_followed_by_a_validation_matches_a_straight_run_bit_for_bit(
    s3_experiment: str, tmp_path: Path, killed_at: int, validating: dict[str, int]
) -> None:
    # 4 batches an epoch, a save every 2 steps, the fit killed as the batch after a save starts. At step 4 the
    # save is on epoch 0's last batch, before its validation, whose loader (and the next epoch's) draw a seed from
    # the RNG after the save; at step 2, with a validation every 2 batches, the validation's loader alone.
    def fit_steps(folder: Path, logger: MLFlowLogger, *, kill: bool = False, ckpt_path: str | None = None) -> Any:
        pl.seed_everything(0, verbose=False)
        model = StepLossLit()
        saving = ModelCheckpoint(dirpath=folder / "checkpoints", every_n_train_steps=2, save_top_k=-1)
        callbacks = [saving, MLflowCheckpoints(), *([KillAtStep(killed_at)] if kill else [])]
        fitted = trainer(4, folder, callbacks, logger=logger, log_every_n_steps=1, **validating)
        fitted.fit(model, *loaders(resumable=True), ckpt_path=ckpt_path)
        return model, fitted

    uri = mlflow.get_tracking_uri()
    straight_logger = MLFlowLogger(experiment_name="unit-s3", tracking_uri=uri)
    straight, straight_trainer = fit_steps(tmp_path / "straight", straight_logger)
    logger = MLFlowLogger(experiment_name="unit-s3", tracking_uri=uri)
    with pytest.raises(Killed):
        fit_steps(tmp_path / "first", logger, kill=True)
    run_id = str(logger.run_id)
    path = checkpoint_path(run_id, to=tmp_path / "download")
    assert torch.load(path, weights_only=True)["global_step"] == killed_at
    resumed, resumed_trainer = fit_steps(
        tmp_path / "second", MLFlowLogger(run_id=run_id, tracking_uri=uri), ckpt_path=path
    )
    assert resumed_trainer.global_step == straight_trainer.global_step == 16
    losses = {
        name: [(m.step, m.value) for m in MlflowClient().get_metric_history(name_run, "train_loss_step")]
        for name, name_run in (("straight", str(straight_logger.run_id)), ("resumed", run_id))
    }
    assert sorted(losses["resumed"]) == sorted(losses["straight"])
    assert_same_training(straight, straight_trainer, resumed, resumed_trainer)


def test_a_run_keyed_by_epoch_refuses_a_fit_that_saves_by_step_before_it_trains(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        fit(1, tmp_path / "epochs")
    run_id = run.info.run_id
    before = [c.model_id for c in tracking.list_checkpoints(run_id)]
    fitted = trainer(
        2, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=2), MLflowCheckpoints()]
    )
    with mlflow.start_run(run_id=run_id), pytest.raises(tracking.TrackingError, match="keys its checkpoints by epoch"):
        fitted.fit(TinyLit(), *loaders())
    assert fitted.global_step == 0
    assert [c.model_id for c in tracking.list_checkpoints(run_id)] == before


@pytest.mark.parametrize("at_train_epoch_end", [False, True])
def test_checkpoint_metrics_are_charted_at_the_steps_lightnings_logger_uses(
    s3_experiment: str, tmp_path: Path, at_train_epoch_end: bool
) -> None:
    # ModelCheckpoint saves at the end of validation, or of the training epoch: Lightning's counters differ there.
    logger = RecordingLogger(experiment_name="unit-s3", tracking_uri=mlflow.get_tracking_uri())
    fit(2, tmp_path, save_top_k=-1, monitor="val_loss", save_on_train_epoch_end=at_train_epoch_end, logger=logger)
    run_id = str(logger.run_id)
    saved = tracking.list_checkpoints(run_id)
    assert [c.step for c in saved] == [4, 8]
    client = MlflowClient()
    for key in ("val_loss", "train_loss"):
        # The last batch of each epoch (global steps 4 and 8 counted from 1): the logger's own points.
        assert logger.steps[key] == {3, 7}, key
        charted = {m.step for m in client.get_metric_history(run_id, key)}
        assert charted == logger.steps[key], f"{key}: stray points at {sorted(charted - logger.steps[key])}"
    for checkpoint in saved:
        model_steps = {m.key: m.step for m in client.get_logged_model(str(checkpoint.model_id)).metrics}
        assert model_steps["val_loss"] == checkpoint.step - 1, model_steps


def test_checkpoint_path_takes_best_an_epoch_and_a_model_uri(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path, save_top_k=-1, monitor="val_loss")
    run_id = run.info.run_id
    best = tracking.find_checkpoint(run_id, "best")
    assert (
        torch.load(checkpoint_path(run_id, "best", to=tmp_path / "b"), weights_only=True)["epoch"]
        == best.manifest.epoch
    )
    assert torch.load(checkpoint_path(run_id, 1, to=tmp_path / "e"), weights_only=True)["epoch"] == 1
    one = tracking.list_checkpoints(run_id)[0]
    assert torch.load(checkpoint_path(one.uri, to=tmp_path / "m"), weights_only=True)["global_step"] == one.step


def test_each_rank_downloads_into_its_own_default_folder(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under DDP every rank calls checkpoint_path before the process group exists, each on its own: in one shared
    # folder a rank's download would swap the files another rank is reading.
    with mlflow.start_run() as run:
        fit(2, tmp_path / "fit")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    paths = []
    for variable, rank in (("RANK", "0"), ("RANK", "1"), ("LOCAL_RANK", "2")):  # torchrun's; Lightning's launcher's
        with monkeypatch.context() as ranked:
            ranked.delenv("RANK", raising=False)
            ranked.setenv(variable, rank)
            paths.append(checkpoint_path(run.info.run_id))
    assert len({os.path.dirname(p) for p in paths}) == 3
    assert all(torch.load(p, weights_only=True)["epoch"] == 1 for p in paths)


def test_a_folder_that_holds_the_checkpoint_is_left_as_it_is(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ranks of a job given one folder: the first downloads, the next finds the files and does not swap them
    # under a rank that is reading them. A folder holding other bytes is downloaded into as before.
    with mlflow.start_run() as run:
        fit(2, tmp_path / "fit")
    shared = tmp_path / "shared"
    path = Path(checkpoint_path(run.info.run_id, to=shared))
    with open(path, "rb") as reading:
        inode = os.fstat(reading.fileno()).st_ino
        assert Path(checkpoint_path(run.info.run_id, to=shared)).stat().st_ino == inode
    path.write_bytes(b"torn")
    assert torch.load(checkpoint_path(run.info.run_id, to=shared), weights_only=True)["epoch"] == 1


def test_a_folder_the_file_system_cannot_lock_is_downloaded_into_as_before(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, operation: int) -> None:
        raise OSError(9, "Bad file descriptor")  # what NFS may answer for a folder opened read-only

    with mlflow.start_run() as run:
        fit(2, tmp_path / "fit")
    import fcntl

    monkeypatch.setattr(fcntl, "flock", refuse)
    assert torch.load(checkpoint_path(run.info.run_id, to=tmp_path / "nfs"), weights_only=True)["epoch"] == 1


def test_cli_lists_shows_verifies_downloads_and_registers(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path, save_top_k=-1, monitor="val_loss")
    run_id = run.info.run_id
    runner = CliRunner()
    listed = runner.invoke(main, ["checkpoints", run_id], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert all(str(c.model_id) in listed.output for c in tracking.list_checkpoints(run_id))
    shown = runner.invoke(main, ["show", run_id, "--checkpoint", "best"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["format"] == "lightning"
    verified = runner.invoke(main, ["verify", run_id])
    assert verified.exit_code == 0, verified.output
    downloaded = runner.invoke(main, ["download", run_id, "--checkpoint", "1", "--to", str(tmp_path / "d")])
    assert downloaded.exit_code == 0, downloaded.output
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    registered = runner.invoke(main, ["register", run_id, "lit-digits", "--checkpoint", "best"])
    assert registered.exit_code == 0, registered.output
    loaded = tracking.load("models:/lit-digits/1")
    assert isinstance(loaded.model, TinyLit) and loaded.epoch == tracking.find_checkpoint(run_id, "best").manifest.epoch


def test_async_checkpoint_io_and_background_uploads_commit_every_save(s3_experiment: str, tmp_path: Path) -> None:
    for name, plugins, background in (("lightning-async", [AsyncCheckpointIO()], False), ("background", [], True)):
        pl.seed_everything(0, verbose=False)
        with mlflow.start_run() as run:
            fitted = trainer(
                3,
                tmp_path / name,
                [
                    ModelCheckpoint(dirpath=tmp_path / name, save_top_k=2, monitor="val_loss", save_last=True),
                    MLflowCheckpoints(background=background),
                ],
                plugins=plugins,
            )
            fitted.fit(TinyLit(), *loaders())
        saved = tracking.list_checkpoints(run.info.run_id)
        kept = {os.path.basename(p) for c in saved for p in _paths(str(c.model_id))}
        assert kept == {p.name for p in (tmp_path / name).iterdir()}, name
        assert _tags(run.info.run_id)[layout.TAG_LATEST] == saved[-1].model_id


def test_background_uploads_stop_their_thread_at_the_end_of_each_fit(s3_experiment: str, tmp_path: Path) -> None:
    def upload_threads() -> int:
        return sum(t.name == "tracking-async-save" for t in threading.enumerate())

    before = upload_threads()
    callback = MLflowCheckpoints(background=True)
    for trial in range(3):  # a sweep: a Trainer per trial (the last two share a callback)
        with mlflow.start_run() as run:
            fitted = trainer(2, tmp_path / str(trial), [MLflowCheckpoints(background=True) if trial == 0 else callback])
            fitted.fit(TinyLit(), *loaders())
        assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]  # committed before it stopped
        assert upload_threads() == before


class RaisingLit(TinyLit):
    """Its training step raises at epoch 1, once ``raised`` is set: user code failing after epoch 0's save."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = threading.Event()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1:
            self.raised.set()
            raise RuntimeError("a bug in the training step (test)")
        return super().training_step(batch, batch_idx)


def no_upload_thread_within(seconds: float, before: int) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sum(t.name == "tracking-async-save" for t in threading.enumerate()) == before:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("upload_fails", [False, True])
def test_a_fit_that_raises_finishes_the_upload_it_queued_and_leaves_no_upload_thread(
    s3_experiment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upload_fails: bool,
) -> None:
    # A sweep or notebook that catches a fit's error must not keep its upload thread, nor lose (or never hear of)
    # the upload queued before the error.
    before = sum(t.name == "tracking-async-save" for t in threading.enumerate())
    module = RaisingLit()
    commit = mirror.commit_local_files

    def held_commit(*args: Any, **kwargs: Any) -> Any:
        assert module.raised.wait(timeout=20), "the training step never raised"  # still uploading as it raises
        if upload_fails:
            raise tracking.StorageError("the store refused the upload (test)")
        return commit(*args, **kwargs)

    monkeypatch.setattr(mirror, "commit_local_files", held_commit)
    with mlflow.start_run() as run, caplog.at_level(logging.ERROR):
        fitted = trainer(3, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "c"), MLflowCheckpoints(background=True)])
        with pytest.raises(RuntimeError, match="a bug in the training step"):
            fitted.fit(module, *loaders())
    assert no_upload_thread_within(10, before)
    saved = [c.epoch for c in tracking.list_checkpoints(run.info.run_id)]
    if upload_fails:
        assert saved == []
        assert any("refused the upload" in r.getMessage() and run.info.run_id in r.getMessage() for r in caplog.records)
    else:
        assert saved == [0]


def test_a_file_removed_while_async_checkpoint_io_writes_or_uploads_it_is_removed_after(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AsyncCheckpointIO removes on the trainer's thread while its worker may still be saving the file: here the
    # worker holds epoch 0's save (written, not yet uploaded) until the trainer has removed that file.
    removed = threading.Event()
    remove = mirror.MirrorIO.remove_checkpoint

    def remove_then_go_on(self: mirror.MirrorIO, path: Any) -> None:
        remove(self, path)
        removed.set()

    class HeldIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            if checkpoint["epoch"] == 0:
                assert removed.wait(timeout=20), "the trainer never removed epoch 0's file"

    monkeypatch.setattr(mirror.MirrorIO, "remove_checkpoint", remove_then_go_on)
    root = tmp_path / "checkpoints"
    with mlflow.start_run() as run:  # save_top_k=1 without a monitor: each epoch's save removes the one before
        fitted = trainer(
            2, tmp_path, [ModelCheckpoint(dirpath=root), MLflowCheckpoints()], plugins=[AsyncCheckpointIO(HeldIO())]
        )
        fitted.fit(TinyLit(), *loaders())
    assert removed.is_set()
    assert [p.name for p in root.iterdir()] == ["epoch=1-step=8.ckpt"]
    saved = tracking.list_checkpoints(run.info.run_id)
    assert [(c.epoch, c.step) for c in saved] == [(1, 8)]
    assert _paths(str(saved[0].model_id)) == [str(root / "epoch=1-step=8.ckpt")]


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_upload_is_not_silent(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise tracking.StorageError("the store refused the upload (test)")

    monkeypatch.setattr(mirror, "commit_local_files", refuse)
    with mlflow.start_run(), pytest.raises(tracking.StorageError, match="refused the upload"):
        fitted = trainer(
            2, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "c"), MLflowCheckpoints(background=background)]
        )
        fitted.fit(TinyLit(), *loaders())


class PathLit(TinyLit):
    def __init__(self, root: Path = Path("/data")) -> None:
        super().__init__()
        self.save_hyperparameters()


class PathData(pl.LightningDataModule):
    def __init__(self, data_dir: Path = Path("/data")) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> Any:
        return loaders()[0]

    def val_dataloader(self) -> Any:
        return loaders()[1]


class Batches(pl.Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.seen += 1


@pytest.mark.parametrize(
    ("module", "data", "key"),
    [(PathLit, None, "'hyper_parameters']['root']"), (TinyLit, PathData, "'datamodule_hyper_parameters']['data_dir']")],
)
def test_a_checkpoint_that_would_not_load_is_refused_before_the_fit_trains(
    s3_experiment: str, tmp_path: Path, module: type[pl.LightningModule], data: type | None, key: str
) -> None:
    # A Path among the hyperparameters: Lightning saves it, torch.load(weights_only=True) cannot read it. Said
    # as the fit starts, not after its first epoch's training, at the first save.
    batches = Batches()
    fitted = trainer(1, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "c"), MLflowCheckpoints(), batches])
    with mlflow.start_run() as run, pytest.raises(ValueError, match=re.escape(f"{key} is a pathlib")) as refused:
        fitted.fit(module(), datamodule=data()) if data else fitted.fit(module(), *loaders())
    assert run.info.run_id in str(refused.value) and "save_hyperparameters(ignore=" in str(refused.value)
    assert batches.seen == 0
    assert tracking.list_checkpoints(run.info.run_id) == []


class TopOneLit(TinyLit):
    """Logs its accuracy under a name MLflow refuses (`@`), as top-k accuracies often are named."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("acc@1", (logits.argmax(-1) == y).float().mean())


def test_metric_names_mlflow_refuses_are_logged_as_lightnings_logger_logs_them(
    s3_experiment: str, tmp_path: Path
) -> None:
    logger = MLFlowLogger(experiment_name="unit-s3", tracking_uri=mlflow.get_tracking_uri())
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "c", monitor="acc@1", mode="max", save_top_k=-1)
    with pytest.warns(RuntimeWarning, match="Replacing acc@1 with acc1"):  # MLFlowLogger's own renaming
        trainer(2, tmp_path, [checkpoints, MLflowCheckpoints()], logger=logger).fit(TopOneLit(), *loaders())
    run_id = str(logger.run_id)
    saved = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in saved] == [0, 1]
    # Under the key the logger charts it by, and ranking the checkpoints as ModelCheckpoint's monitor does.
    assert all("acc1" in c.metrics and "val_loss" in c.metrics for c in saved)
    assert "acc1" in MlflowClient().get_run(run_id).data.metrics
    tags = _tags(run_id)
    assert (tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == ("acc1", "max")
    best = tracking.find_checkpoint(run_id, "best")
    assert best.manifest.metrics["acc1"] == max(c.metrics["acc1"] for c in saved)


def test_a_metric_name_mlflow_refuses_even_renamed_is_left_out_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match=r"'val//loss' is not logged with the checkpoint: its name is a path"):
        assert renamed({"val//loss": 1.0, "acc@1": 0.5}, metric_key) == {"acc1": 0.5}


def test_a_trainer_without_model_checkpoint_is_warned_that_only_saves_by_hand_are_logged(
    s3_experiment: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pl.seed_everything(0, verbose=False)
    fitted = trainer(1, tmp_path, [MLflowCheckpoints()], enable_checkpointing=False)
    with mlflow.start_run() as run, caplog.at_level(logging.WARNING):
        fitted.fit(TinyLit(), *loaders())
        assert tracking.list_checkpoints(run.info.run_id) == []
        fitted.save_checkpoint(tmp_path / "by-hand.ckpt")
    said = [r.getMessage() for r in caplog.records if "ModelCheckpoint" in r.getMessage()]
    assert len(said) == 1 and run.info.run_id in said[0] and "enable_checkpointing" in said[0], said
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]


def test_without_a_run_the_first_save_says_how_to_give_one(s3_experiment: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no active MLflow run"):
        fit(1, tmp_path)


def test_the_core_does_not_import_lightning() -> None:
    code = (
        "import sys, tracking, tracking.loader, tracking.rebuild, tracking.checkpointer, tracking.downloader;"
        "import tracking.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers')"
        " or m.startswith('tracking.integrations.')];"
        "sys.exit(f'imported: {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def assert_same_training(
    straight: pl.LightningModule, straight_trainer: pl.Trainer, resumed: pl.LightningModule, resumed_trainer: pl.Trainer
) -> None:
    """Bit for bit the same weights and optimizer state after a resumed fit as after the straight one."""
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    live, other = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    for index, entry in live["state"].items():
        for key, value in entry.items():
            assert torch.equal(other["state"][index][key], value), (index, key)


def test_the_best_pointer_follows_the_model_checkpoint_that_wrote_the_file_in_a_shared_folder(
    s3_experiment: str, tmp_path: Path
) -> None:
    # Both in the trainer's default folder: one keeps the last 2 by step, the other the best by val_loss.
    by_step = ModelCheckpoint(
        filename="s-{epoch}-{step}", every_n_train_steps=3, save_top_k=2, monitor="step", mode="max"
    )
    by_loss = ModelCheckpoint(filename="b-{epoch}-{step}", monitor="val_loss", save_top_k=1)
    pl.seed_everything(0, verbose=False)
    with mlflow.start_run() as run:
        trainer(4, tmp_path, [by_step, by_loss, MLflowCheckpoints()]).fit(TinyLit(), *loaders())
    assert by_step.dirpath == by_loss.dirpath
    best = tracking.find_checkpoint(run.info.run_id, "best")
    assert _paths(str(best.model_id)) == [by_loss.best_model_path]
    tags = _tags(run.info.run_id)
    assert (tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == ("val_loss", "min")


def test_saves_at_several_validations_an_epoch_are_keyed_by_step_and_each_one_stays(
    s3_experiment: str, tmp_path: Path
) -> None:
    # val_check_interval=0.5: ModelCheckpoint saves after each validation, twice an epoch (4 batches an epoch).
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=-1, monitor="val_loss")
    with mlflow.start_run() as run:
        trainer(2, tmp_path, [checkpoints, MLflowCheckpoints()], val_check_interval=0.5).fit(TinyLit(), *loaders())
    saved = tracking.list_checkpoints(run.info.run_id)
    assert [(c.keyed_by, c.epoch, c.step) for c in saved] == [
        ("step", 0, 2),
        ("step", 0, 4),
        ("step", 1, 6),
        ("step", 1, 8),
    ]
    assert sorted(p for c in saved for p in _paths(str(c.model_id))) == sorted(
        str(p) for p in (tmp_path / "c").iterdir()
    )


def test_a_fit_resumed_from_before_the_runs_latest_in_the_same_run_is_refused_before_it_trains(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        fit(3, tmp_path / "first", save_top_k=-1, monitor="val_loss")
    run_id = run.info.run_id
    before = {c.model_id: c.key for c in tracking.list_checkpoints(run_id)}
    latest = _tags(run_id)[layout.TAG_LATEST]
    with mlflow.start_run(run_id=run_id), pytest.raises(tracking.TrackingError) as refused:
        fit(5, tmp_path / "again", ckpt_path=checkpoint_path(run_id, 1, to=tmp_path / "e1"))
    message = str(refused.value)
    assert run_id in message and "epoch 1" in message and "epochs 2" in message
    assert "new MLflow run" in message and "checkpoint_path" in message
    assert not (tmp_path / "again" / "checkpoints").exists()  # nothing trained, nothing saved
    assert {c.model_id: c.key for c in tracking.list_checkpoints(run_id)} == before
    assert _tags(run_id)[layout.TAG_LATEST] == latest


def test_a_fresh_fit_into_a_run_with_lightning_checkpoints_is_refused_before_it_trains(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        fit(2, tmp_path / "first", save_top_k=-1)
    run_id = run.info.run_id
    before = {c.model_id: c.key for c in tracking.list_checkpoints(run_id)}
    latest = _tags(run_id)[layout.TAG_LATEST]
    # A notebook cell run again into its run: a new fit, from no checkpoint.
    with mlflow.start_run(run_id=run_id), pytest.raises(tracking.TrackingError) as refused:
        fit(2, tmp_path / "again", save_top_k=-1)
    message = str(refused.value)
    assert message.startswith(f"run {run_id}: this training starts afresh") and "latest epoch 1" in message
    assert "new MLflow run" in message and f"checkpoint_path({run_id!r})" in message and "\n" not in message
    assert not (tmp_path / "again" / "checkpoints").exists()  # nothing trained, nothing saved
    assert {c.model_id: c.key for c in tracking.list_checkpoints(run_id)} == before
    assert _tags(run_id)[layout.TAG_LATEST] == latest


class ValidationCounts(TinyLit):
    """Counts its validation steps: a fit's sanity check runs two before its first batch."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.validated = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validated += 1
        super().validation_step(batch, batch_idx)


class RestoresAfterSetup(SingleDeviceStrategy):
    """Restores a checkpoint after its setup and ``on_fit_start``, as DeepSpeed's and FSDP's strategies do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_a_second_fit_of_the_same_trainer_goes_on_in_the_run_where_the_first_stopped(
    s3_experiment: str, tmp_path: Path
) -> None:
    # A notebook: fit 2 epochs, look, raise max_epochs and fit again. Lightning goes on from epoch 2, step 8.
    with mlflow.start_run() as run:
        pl.seed_everything(0, verbose=False)
        module = TinyLit()
        fitted = trainer(2, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=-1), MLflowCheckpoints()])
        fitted.fit(module, *loaders())
        fitted.fit_loop.max_epochs = 4
        fitted.fit(module, *loaders())
    assert fitted.global_step == 16
    saved = tracking.list_checkpoints(run.info.run_id)
    assert [(c.epoch, c.step) for c in saved] == [(0, 4), (1, 8), (2, 12), (3, 16)]
    assert _tags(run.info.run_id)[layout.TAG_LATEST] == saved[-1].model_id


def test_a_second_fit_of_the_same_trainer_in_another_run_logs_to_that_run(s3_experiment: str, tmp_path: Path) -> None:
    # A notebook: one Trainer, each fit inside a run of its own (a second try, a longer schedule).
    pl.seed_everything(0, verbose=False)
    module = TinyLit()
    fitted = trainer(1, tmp_path, [ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=-1), MLflowCheckpoints()])
    with mlflow.start_run() as first:
        fitted.fit(module, *loaders())
    fitted.fit_loop.max_epochs = 2
    with mlflow.start_run() as second:
        fitted.fit(module, *loaders())
    assert [c.epoch for c in tracking.list_checkpoints(first.info.run_id)] == [0]
    assert [c.epoch for c in tracking.list_checkpoints(second.info.run_id)] == [1]
    assert _tags(second.info.run_id)[layout.TAG_LATEST] == tracking.list_checkpoints(second.info.run_id)[0].model_id


@pytest.mark.parametrize("restores_after_setup", [False, True])
def test_a_fresh_fit_is_refused_before_the_sanity_check_validates_and_a_resumed_one_goes_on(
    s3_experiment: str, tmp_path: Path, restores_after_setup: bool
) -> None:
    with mlflow.start_run() as run:
        fit(1, tmp_path / "first")
    run_id = run.info.run_id

    def sanity_checked(folder: Path) -> pl.Trainer:
        strategy = {"strategy": RestoresAfterSetup(torch.device("cpu"))} if restores_after_setup else {}
        callbacks = [ModelCheckpoint(dirpath=folder / "checkpoints"), MLflowCheckpoints()]
        return trainer(2, folder, callbacks, num_sanity_val_steps=2, **strategy)

    module = ValidationCounts()
    with mlflow.start_run(run_id=run_id), pytest.raises(tracking.TrackingError, match="starts afresh"):
        sanity_checked(tmp_path / "again").fit(module, *loaders())
    assert module.validated == 0  # the user's validation code never ran for a refused fit
    resumed = ValidationCounts()
    with mlflow.start_run(run_id=run_id):
        sanity_checked(tmp_path / "resumed").fit(
            resumed, *loaders(), ckpt_path=checkpoint_path(run_id, to=tmp_path / "latest")
        )
    assert resumed.validated > 0 and [c.epoch for c in tracking.list_checkpoints(run_id)] == [0, 1]


def test_a_fresh_fit_is_refused_before_lightnings_logger_logs_its_hyperparameters(
    s3_experiment: str, tmp_path: Path
) -> None:
    # MLflow refuses a param logged again with another value: refused later, the fit of a wider module failed
    # on MLflow's own error, and one of the same module logged its hyperparameters into the run it then refused.
    logger = MLFlowLogger(experiment_name="unit-s3", tracking_uri=mlflow.get_tracking_uri())
    fit(1, tmp_path / "first", logger=logger)
    run_id = str(logger.run_id)
    again = MLFlowLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "again"), MLflowCheckpoints()]
    with pytest.raises(tracking.TrackingError, match="starts afresh"):
        trainer(1, tmp_path / "again", callbacks, logger=again).fit(TinyLit(hidden=32), *loaders())
    assert MlflowClient().get_run(run_id).data.params["hidden"] == "16"


def test_a_fit_resumed_from_the_latest_or_into_a_new_run_goes_on(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        fit(2, tmp_path / "first", save_top_k=-1, monitor="val_loss")
    run_id = run.info.run_id
    with mlflow.start_run() as child:  # a new run from an earlier checkpoint
        fit(3, tmp_path / "child", ckpt_path=checkpoint_path(run_id, 0, to=tmp_path / "e0"), save_top_k=-1)
    assert [c.epoch for c in tracking.list_checkpoints(child.info.run_id)] == [1, 2]
    with mlflow.start_run(run_id=run_id):  # the same run from its latest
        fit(3, tmp_path / "again", ckpt_path=checkpoint_path(run_id, to=tmp_path / "latest"), save_top_k=-1)
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [0, 1, 2]


def test_a_fit_resumed_from_the_latest_the_tags_name_goes_on_past_a_save_that_died_before_moving_them(
    s3_experiment: str, tmp_path: Path
) -> None:
    # Killed after epoch 2's checkpoint was READY but before the run's tags moved: the latest is epoch 1's, as
    # readers and checkpoint_path say, and resuming from it was refused as a rewrite of epoch 2.
    with mlflow.start_run() as run:
        fit(3, tmp_path / "first", save_top_k=-1)
    run_id = run.info.run_id
    saved = tracking.list_checkpoints(run_id)
    MlflowClient().set_tag(run_id, layout.TAG_LATEST, saved[1].model_id)
    path = checkpoint_path(run_id, to=tmp_path / "latest")
    assert torch.load(path, weights_only=True)["epoch"] == 1
    with mlflow.start_run(run_id=run_id):
        fit(4, tmp_path / "again", ckpt_path=path, save_top_k=-1)
    after = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in after] == [0, 1, 2, 3]
    assert _tags(run_id)[layout.TAG_LATEST] == after[-1].model_id


def test_a_weights_only_run_says_so_instead_of_how_to_resume(
    s3_experiment: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        fit(1, tmp_path, save_weights_only=True)
    run_id = run.info.run_id
    description = _tags(run_id)["mlflow.note.content"]
    assert "weights only" in description and "ckpt_path=tracking.integrations.lightning" not in description
    with caplog.at_level(logging.WARNING, logger="tracking.integrations.lightning.resume"):
        path = checkpoint_path(run_id, to=tmp_path / "download")
    assert "optimizer_states" not in torch.load(path, weights_only=True)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert run_id in warning and "weights only" in warning and "tracking.load" in warning
    assert isinstance(tracking.load(run_id).model, TinyLit)


@pytest.mark.parametrize("background", [False, True])
def test_a_weights_only_model_checkpoint_listed_first_leaves_the_full_checkpoint_to_resume_from(
    s3_experiment: str, tmp_path: Path, background: bool
) -> None:
    # Weights for export beside full checkpoints for resuming: the weights-only file of a save is written first.
    def callbacks() -> list[Any]:
        return [
            ModelCheckpoint(dirpath=tmp_path / "weights", save_weights_only=True),
            ModelCheckpoint(dirpath=tmp_path / "full", monitor="val_loss"),
            MLflowCheckpoints(background=background),
        ]

    with mlflow.start_run() as run:
        pl.seed_everything(0, verbose=False)
        trainer(2, tmp_path, callbacks()).fit(TinyLit(), *loaders())
    run_id = run.info.run_id
    (saved,) = tracking.list_checkpoints(run_id)
    assert (saved.epoch, saved.step) == (1, 8) and saved.manifest.optimizer is not None
    assert _paths(str(saved.model_id)) == [
        str(tmp_path / "full" / "epoch=1-step=8.ckpt"),
        str(tmp_path / "weights" / "epoch=1-step=8.ckpt"),
    ]
    assert len(MlflowClient().search_logged_models(experiment_ids=[s3_experiment])) == 1
    assert "weights only" not in _tags(run_id)["mlflow.note.content"]
    path = checkpoint_path(run_id, to=tmp_path / "download")
    assert "optimizer_states" in torch.load(path, weights_only=True)
    with mlflow.start_run(run_id=run_id):  # the run goes on by its ID
        pl.seed_everything(0, verbose=False)
        trainer(3, tmp_path, callbacks()).fit(TinyLit(), *loaders(), ckpt_path=path)
    assert [(c.epoch, c.manifest.optimizer is not None) for c in tracking.list_checkpoints(run_id)] == [(2, True)]


def test_a_fresh_fit_into_a_weights_only_run_is_offered_only_a_new_run(s3_experiment: str, tmp_path: Path) -> None:
    # No fit resumes from the weights alone: the resume line a run of full checkpoints is offered would fail.
    with mlflow.start_run() as run:
        fit(2, tmp_path / "first", save_top_k=-1, save_weights_only=True)
    run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id), pytest.raises(tracking.TrackingError) as refused:
        fit(2, tmp_path / "again", save_top_k=-1, save_weights_only=True)
    message = str(refused.value)
    assert message.startswith(f"run {run_id}: this training starts afresh") and "latest epoch 1" in message
    assert "new MLflow run" in message and "ckpt_path" not in message and "\n" not in message
    assert "weights alone" in message and "save_weights_only=True" in message
    assert f"load_from_checkpoint(checkpoint_path({run_id!r}))" in message
    assert not (tmp_path / "again" / "checkpoints").exists()
