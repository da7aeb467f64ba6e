"""A Lightning checkpoint of several optimizers (manual optimization, a GAN) over a real run (moto S3 + sqlite):
described by name ("0", "1": their index in Lightning's list), rebuilt whole by tracking.load, restored by name,
and listed as such by the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, StepLR

import tracking
from tests.lightning_model import TinyLit, TwoOptimizerLit, fit, halving
from tracking import spec
from tracking.cli import main
from tracking.integrations.lightning import callback, description


def _fit(folder: Path, **kwargs: Any) -> tuple[str, TwoOptimizerLit, pl.Trainer]:
    with mlflow.start_run() as run:
        module, trainer = fit(2, folder, module=lambda: TwoOptimizerLit(**kwargs))
    return run.info.run_id, module, trainer


def _same_state(restored: dict[str, Any], live: dict[str, Any]) -> None:
    assert restored["param_groups"] == live["param_groups"]
    assert restored["state"].keys() == live["state"].keys() and live["state"]
    for index, entry in live["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(restored["state"][index][key]), torch.as_tensor(value)), (index, key)


def test_load_rebuilds_every_optimizer_and_scheduler_by_its_index(s3_experiment: str, tmp_path: Path) -> None:
    run_id, module, trainer = _fit(tmp_path)
    manifest = tracking.find_checkpoint(run_id).manifest
    assert manifest.optimizer is None and manifest.scheduler is None and manifest.format_version == 2
    assert manifest.optimizers is not None and sorted(manifest.optimizers) == ["0", "1"]
    assert manifest.schedulers is not None and sorted(manifest.schedulers) == ["0", "1"]
    loaded = tracking.load(run_id, mode="train")
    assert isinstance(loaded.model, TwoOptimizerLit) and loaded.model.training
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert loaded.optimizer is None and loaded.scheduler is None
    assert sorted(loaded.optimizers) == ["0", "1"] and sorted(loaded.schedulers) == ["0", "1"]
    # Each under the index of its optimizer in configure_optimizers, of its own class, with its own state.
    assert isinstance(loaded.optimizers["0"], torch.optim.Adam) and isinstance(loaded.optimizers["1"], torch.optim.SGD)
    for index, live in enumerate(trainer.optimizers):
        _same_state(loaded.optimizers[str(index)].state_dict(), live.state_dict())
    # The schedulers came in the other order: each is the one of its optimizer's name, over that optimizer.
    by_optimizer = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}  # type: ignore[union-attr]
    for index, live in enumerate(trainer.optimizers):
        rebuilt = loaded.schedulers[str(index)]
        assert type(rebuilt) is type(by_optimizer[id(live)])
        assert rebuilt.state_dict() == by_optimizer[id(live)].state_dict()
        assert rebuilt.optimizer is loaded.optimizers[str(index)]
    # Building a scheduler steps it: the learning rates it wrote over are put back.
    for index, live in enumerate(trainer.optimizers):
        assert [g["lr"] for g in loaded.optimizers[str(index)].param_groups] == [g["lr"] for g in live.param_groups]


def test_factories_are_taken_by_name_and_one_factory_is_refused(s3_experiment: str, tmp_path: Path) -> None:
    run_id, _, trainer = _fit(tmp_path)
    with pytest.raises(tracking.MismatchError, match=r"optimizers named \['0', '1'\].*one factory"):
        tracking.load(run_id, mode="train", optimizer=lambda parameters: torch.optim.Adam(parameters))
    given: list[Any] = []

    def discriminator(parameters: Any) -> torch.optim.Optimizer:
        given.append(parameters)
        return torch.optim.SGD(parameters, lr=1.0, momentum=0.5)

    loaded = tracking.load(run_id, mode="train", optimizer={"1": discriminator})
    # The parameters that optimizer trained, grouped as when saved; its state (learning rate too) loaded.
    (groups,) = given
    assert [p for g in groups for p in g["params"]] == list(loaded.model.discriminator.parameters())
    _same_state(loaded.optimizers["1"].state_dict(), trainer.optimizers[1].state_dict())
    _same_state(loaded.optimizers["0"].state_dict(), trainer.optimizers[0].state_dict())


def test_a_scheduler_that_cannot_be_rebuilt_is_left_out_unless_a_factory_of_its_name_is_given(
    s3_experiment: str, tmp_path: Path
) -> None:
    run_id, _, trainer = _fit(tmp_path, lambda_lr=True)
    schedulers = tracking.find_checkpoint(run_id).manifest.schedulers
    assert schedulers is not None and schedulers["0"]["init_kwargs"] is None
    loaded = tracking.load(run_id, mode="train")
    assert sorted(loaded.optimizers) == ["0", "1"] and sorted(loaded.schedulers) == ["1"]
    given = tracking.load(run_id, mode="train", scheduler={"0": halving})
    (live,) = [c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, LambdaLR)]
    assert isinstance(given.schedulers["0"], LambdaLR)
    assert given.schedulers["0"].last_epoch == live.last_epoch == 2
    assert given.schedulers["0"].optimizer is given.optimizers["0"]


def test_restore_loads_each_optimizer_and_scheduler_by_its_index(s3_experiment: str, tmp_path: Path) -> None:
    run_id, _, trainer = _fit(tmp_path)
    fresh = TwoOptimizerLit()
    optimizers, schedulers = fresh.configure_optimizers()
    named = {"0": optimizers[0], "1": optimizers[1]}
    tracking.restore(run_id, fresh, named, {"0": schedulers[1], "1": schedulers[0]})
    for index, live in enumerate(trainer.optimizers):
        _same_state(named[str(index)].state_dict(), live.state_dict())
    assert schedulers[1].state_dict() == trainer.lr_scheduler_configs[1].scheduler.state_dict()


def test_the_cli_and_the_runs_description_name_both_optimizers(s3_experiment: str, tmp_path: Path) -> None:
    run_id, _, _ = _fit(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(main, ["checkpoints", run_id, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [c["optimizers"] for c in json.loads(listed.stdout)] == [["0", "1"]]
    shown = runner.invoke(main, ["show", run_id])
    assert shown.exit_code == 0, shown.output
    manifest = json.loads(shown.stdout)
    assert manifest["optimizer"] is None
    assert {name: d["class"] for name, d in manifest["optimizers"].items()} == {
        "0": "torch.optim.adam:Adam",
        "1": "torch.optim.sgd:SGD",
    }
    note = MlflowClient().get_run(run_id).data.tags["mlflow.note.content"]
    assert "loaded.optimizers['0']" in note and "`1` (`torch.optim.sgd:SGD`)" in note


def test_a_checkpoint_whose_manifest_describes_the_first_optimizer_alone_warns_that_the_others_are_left_out(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As versions before several were described wrote it: the first optimizer and the first scheduler.
    def first_only(trainer: pl.Trainer, module: pl.LightningModule) -> description.SaveContext:
        context = description.save_context(trainer, module)
        first = spec.describe_scheduler(trainer.lr_scheduler_configs[0].scheduler, None)
        optimizer = spec.describe_optimizer(trainer.optimizers[0], module)
        names = {f.name: None for f in dataclasses.fields(context) if f.name in ("optimizers", "schedulers")}
        return dataclasses.replace(context, optimizer=optimizer, scheduler=first, **names)

    monkeypatch.setattr(callback, "save_context", first_only)
    run_id, _, trainer = _fit(tmp_path)
    left_out = r"1 of its 2 optimizers .* describes the first alone\) and 1 of its 2 LR schedulers"
    with pytest.warns(UserWarning, match=rf"run {run_id}: .* left out of this load: {left_out}.*checkpoint_path"):
        loaded = tracking.load(run_id, mode="train")
    assert isinstance(loaded.optimizer, torch.optim.Adam) and not loaded.optimizers
    _same_state(loaded.optimizer.state_dict(), trainer.optimizers[0].state_dict())


class TwoSchedulersLit(TinyLit):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [StepLR(optimizer, 2, 0.5), ExponentialLR(optimizer, 0.9)]


def test_a_second_scheduler_of_one_optimizer_is_said_to_be_left_out(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        _, trainer = fit(2, tmp_path, module=TwoSchedulersLit)
    with pytest.warns(UserWarning, match=r"left out of this load: 1 of its 2 LR schedulers \(the first of each"):
        loaded = tracking.load(run.info.run_id, mode="train")
    assert isinstance(loaded.scheduler, StepLR)
    assert loaded.scheduler.state_dict() == trainer.lr_scheduler_configs[0].scheduler.state_dict()


class LambdaLit(TinyLit):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": halving(optimizer)}


def test_one_optimizers_scheduler_that_cannot_be_rebuilt_is_taken_by_a_factory_or_by_restore(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        _, trainer = fit(2, tmp_path, module=LambdaLit)
    run_id, saved = run.info.run_id, trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert saved["last_epoch"] == 2
    assert tracking.load(run_id, mode="train").scheduler is None  # no factory: left out, as README says
    rebuilt = tracking.load(run_id, mode="train", scheduler=halving).scheduler
    assert isinstance(rebuilt, LambdaLR) and rebuilt.state_dict()["last_epoch"] == 2
    fresh = LambdaLit()
    optimizer = torch.optim.Adam(fresh.parameters(), lr=0.01)
    given = halving(optimizer)
    tracking.restore(run_id, fresh, optimizer, given)
    assert given.state_dict()["last_epoch"] == 2 and given.get_last_lr() == rebuilt.get_last_lr()
