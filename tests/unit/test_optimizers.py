"""Several optimizers in one checkpoint, by name (a GAN's generator and discriminator, each with its scheduler):
logged, restored and rebuilt by name, bit for bit; names that do not match refused; one optimizer stored as always."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner

import tracking
from pipelines.models import Model
from tests.unit.conftest import BUCKET
from tests.unit.gan import setup, train
from tests.unit.test_loader import rewrite, tamper_manifest
from tracking import layout, manifest
from tracking.cli import main as cli
from tracking.selection import find_checkpoint

REPO = Path(__file__).resolve().parents[2]


def assert_same(found: Any, expected: Any, where: str = "") -> None:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and torch.equal(found, expected), where
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and set(found) == set(expected), where
        for key in expected:
            assert_same(found[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert found == expected, where


def states(model: torch.nn.Module, optimizers: dict[str, Any], schedulers: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": {name: one.state_dict() for name, one in optimizers.items()},
        "schedulers": {name: one.state_dict() for name, one in schedulers.items()},
    }


def differs(found: Any, expected: Any) -> bool:
    try:
        assert_same(found, expected)
    except AssertionError:
        return True
    return False


# ------------------------------------------------------------ fresh process

CHILD = textwrap.dedent(
    """
    import sys, torch, tracking
    from tests.unit.gan import train  # the model's code: the loader never imports a module a manifest names
    run_id, out = sys.argv[1], sys.argv[2]
    loaded = tracking.load(run_id, mode="train")
    result = {"types": {name: type(one).__name__ for name, one in loaded.optimizers.items()}}
    train(loaded.model, loaded.optimizers, loaded.schedulers, steps=4, seed=7)
    result["model"] = loaded.model.state_dict()
    result["optimizers"] = {name: one.state_dict() for name, one in loaded.optimizers.items()}
    result["schedulers"] = {name: one.state_dict() for name, one in loaded.schedulers.items()}
    torch.save(result, out)
    """
)


def test_a_fresh_process_rebuilds_both_optimizers_and_schedulers_and_trains_on_as_the_originals(
    tracking_s3_server: str, tracking_store: str, tmp_path: Path
) -> None:
    experiment_id = mlflow.create_experiment("gan", artifact_location=f"s3://{BUCKET}/exp")
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=5, seed=1)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_checkpoint(model, optimizers, epoch=3, scheduler=schedulers)

    out = tmp_path / "child.pt"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, run.info.run_id, str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["types"] == {"generator": "Adam", "discriminator": "Adam"}

    # The same N steps of the originals: the rebuilt objects went exactly where they go.
    train(model, optimizers, schedulers, steps=4, seed=7)
    expected = states(model, optimizers, schedulers)
    fresh_model, fresh_optimizers, fresh_schedulers = setup(seed=5)
    train(fresh_model, fresh_optimizers, fresh_schedulers, steps=4, seed=7)
    assert differs(states(fresh_model, fresh_optimizers, fresh_schedulers)["model"], expected["model"])
    for key in ("model", "optimizers", "schedulers"):
        assert_same(result[key], expected[key], key)
    assert expected["optimizers"]["generator"]["param_groups"][0]["lr"] == 1e-2 * 0.5**4  # StepLR(2, 0.5), 9 steps


# ------------------------------------------------------------ in process


def test_restore_by_name_is_bit_exact_and_the_checkpoint_holds_each_state_by_name(experiment: str) -> None:
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=3, seed=1)
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, optimizers, epoch=2, scheduler=schedulers)
    saved = states(model, optimizers, schedulers)

    into, into_optimizers, into_schedulers = setup(seed=5)
    assert differs(states(into, into_optimizers, into_schedulers), saved)  # the state differed before
    loaded = tracking.restore(run.info.run_id, into, into_optimizers, into_schedulers)
    assert_same(states(into, into_optimizers, into_schedulers), saved)  # and matches after
    assert loaded.optimizers == into_optimizers and loaded.schedulers == into_schedulers
    assert (loaded.optimizer, loaded.scheduler) == (None, None)

    # What the user's own torch.load reads: each optimizer's and scheduler's state_dict() under its name.
    located = find_checkpoint(run.info.run_id)
    raw = torch.load(io.BytesIO(bytes(located.read(layout.CHECKPOINT_FILE))), weights_only=True)
    assert set(raw) == {"epoch", "model_state", "optim_state", "step", "metrics", "scheduler_state"}
    assert_same(raw["optim_state"], saved["optimizers"])
    assert_same(raw["scheduler_state"], saved["schedulers"])
    described = logged.manifest
    assert described.format_version == manifest.NAMED_OPTIMIZERS_VERSION
    assert (described.optimizer, described.scheduler) == (None, None)
    assert described.optimizers is not None and described.schedulers is not None
    assert described.optimizers["generator"]["param_groups"] == [
        {"params": ["generator.0.weight", "generator.0.bias", "generator.2.weight", "generator.2.bias"]}
    ]
    assert described.schedulers["discriminator"]["class"] == "torch.optim.lr_scheduler:ExponentialLR"


def test_load_in_train_mode_rebuilds_every_named_optimizer_and_scheduler(s3_experiment: str) -> None:
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=3, seed=1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=2, scheduler=schedulers)
    loaded = tracking.load(run.info.run_id, mode="train")
    assert (loaded.optimizer, loaded.scheduler) == (None, None)
    assert sorted(loaded.optimizers) == sorted(loaded.schedulers) == ["discriminator", "generator"]
    assert isinstance(loaded.schedulers["discriminator"], torch.optim.lr_scheduler.ExponentialLR)
    assert_same(states(loaded.model, loaded.optimizers, loaded.schedulers), states(model, optimizers, schedulers))
    # Each optimizer holds its own module's parameters, not the whole model's.
    generator = {id(p) for p in loaded.model.generator.parameters()}
    assert {id(p) for g in loaded.optimizers["generator"].param_groups for p in g["params"]} == generator

    # A factory for some of the names: given the parameters that optimizer trained, grouped as saved.
    given: list[Any] = []

    def factory(groups: Any) -> torch.optim.Optimizer:
        given.append(groups)
        return torch.optim.Adam(groups, lr=0.5)

    rebuilt = tracking.load(run.info.run_id, mode="train", optimizer={"discriminator": factory})
    assert rebuilt.optimizer is None and sorted(rebuilt.optimizers) == ["discriminator", "generator"]
    assert len(given) == 1 and [len(group["params"]) for group in given[0]] == [4]
    assert_same(rebuilt.optimizers["discriminator"].state_dict(), optimizers["discriminator"].state_dict())

    with pytest.raises(tracking.MismatchError) as refused:
        tracking.load(run.info.run_id, mode="train", optimizer={"critic": factory})
    assert "['discriminator', 'generator']" in str(refused.value) and "['critic']" in str(refused.value)
    with pytest.raises(tracking.MismatchError, match="was given one factory"):
        tracking.load(run.info.run_id, mode="train", optimizer=factory)
    with pytest.raises(TypeError, match=r"optimizer\['generator'\] must be a factory"):
        tracking.load(run.info.run_id, mode="train", optimizer={"generator": 3})  # type: ignore[dict-item]


def test_restore_refuses_names_or_shapes_that_do_not_match_before_loading_anything(s3_experiment: str) -> None:
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=2, seed=1)
    single_model = Model(6)
    single = torch.optim.SGD(single_model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)
    with mlflow.start_run() as single_run:
        tracking.log_checkpoint(single_model, single, epoch=1)
    path = find_checkpoint(run.info.run_id).store.describe(layout.CHECKPOINT_FILE)

    into, into_optimizers, into_schedulers = setup(seed=5)
    before = states(into, into_optimizers, into_schedulers)
    run_id = run.info.run_id
    cases: list[tuple[Any, Any, str]] = [
        ({"generator": into_optimizers["generator"]}, None, "named ['generator']"),
        ({**into_optimizers, "critic": single}, None, "named ['critic', 'discriminator', 'generator']"),
        (into_optimizers["generator"], None, "given one Adam"),
        (into_optimizers, {"generator": into_schedulers["generator"]}, "schedulers named ['generator']"),
    ]
    for optimizer, scheduler, given in cases:
        with pytest.raises(tracking.MismatchError) as refused:
            tracking.restore(run_id, into, optimizer, scheduler)
        message = str(refused.value)
        assert message.startswith(f"run {run_id}: checkpoint-epoch-0001 (m-"), message
        assert path in message and "['discriminator', 'generator']" in message and given in message, message
        assert "pass optimizer=" in message or "pass scheduler=" in message, message
    assert_same(states(into, into_optimizers, into_schedulers), before)  # nothing was loaded

    # The reverse: a checkpoint of one optimizer, given several by name.
    with pytest.raises(tracking.MismatchError) as refused:
        tracking.restore(single_run.info.run_id, Model(6), {"a": torch.optim.SGD(Model(6).parameters(), lr=0.1)})
    message = str(refused.value)
    assert message.startswith(f"run {single_run.info.run_id}: checkpoint-epoch-0001 (m-")
    assert "holds one optimizer" in message and "['a']" in message and "pass optimizer=<one optimizer>" in message


def test_bad_names_and_values_are_refused_before_anything_is_stored(s3_experiment: str) -> None:
    model, optimizers, schedulers = setup()
    other = torch.optim.SGD(Model(6).parameters(), lr=0.1)
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        ({1: optimizers["generator"]}, None, TypeError, "the key 1"),
        ({"": optimizers["generator"]}, None, ValueError, "the key ''"),
        ({}, None, ValueError, "empty mapping"),
        ({"generator": "adam"}, None, TypeError, r"optimizer\['generator'\] must be a torch.optim.Optimizer"),
        ({"a": optimizers["generator"], "b": optimizers["generator"]}, None, ValueError, "one optimizer twice"),
        (optimizers, schedulers["generator"], TypeError, "scheduler= is one StepLR"),
        (optimizers["generator"], schedulers, TypeError, "scheduler= is a mapping of names, optimizer= is not"),
        (optimizers, {"critic": schedulers["generator"]}, ValueError, r"scheduler\['critic'\] has no optimizer"),
        (optimizers, {"discriminator": schedulers["generator"]}, ValueError, "drives another optimizer"),
        ({**optimizers, "other": other}, None, ValueError, r"optimizer\['other'\]: the optimizer holds parameters"),
    ]
    with mlflow.start_run() as run:
        for optimizer, scheduler, error, message in cases:
            with pytest.raises(error, match=message):
                tracking.log_checkpoint(model, optimizer, epoch=1, scheduler=scheduler)
            with pytest.raises(error, match=message):
                tracking.Checkpointer(every_n_epochs=1).save(model, optimizer, epoch=1, scheduler=scheduler)
    assert tracking.list_checkpoints(run.info.run_id) == []


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_checkpointer_saves_and_retains_named_optimizers(s3_experiment: str, async_save: bool) -> None:
    model, optimizers, schedulers = setup()
    checkpointer = tracking.Checkpointer(every_n_epochs=2, keep_last=1, async_save=async_save)
    with mlflow.start_run() as run:
        for epoch in (1, 2, 3, 4):
            train(model, optimizers, schedulers, steps=2, seed=epoch)
            checkpointer.save(model, optimizers, epoch=epoch, scheduler=schedulers, metrics={"val_loss": 1.0 / epoch})
        checkpointer.close()
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [4]
    into, into_optimizers, into_schedulers = setup(seed=5)
    tracking.restore(run.info.run_id, into, into_optimizers, into_schedulers)
    assert_same(states(into, into_optimizers, into_schedulers), states(model, optimizers, schedulers))
    description = mlflow.get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert "the optimizers `discriminator` (`torch.optim.adam:Adam`), `generator` (`torch.optim.adam:Adam`)" in (
        description
    )
    assert "loaded.optimizers['discriminator']" in description

    # The CLI lists and shows it with its names.
    runner = CliRunner()
    listed = runner.invoke(cli, ["checkpoints", run.info.run_id, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)[0]["optimizers"] == ["discriminator", "generator"]
    table = runner.invoke(cli, ["checkpoints", run.info.run_id], terminal_width=200)
    assert table.exit_code == 0 and "discriminator, generator" in table.output, table.output
    shown = runner.invoke(cli, ["show", run.info.run_id])
    assert shown.exit_code == 0 and '"generator": {' in shown.output, shown.output


# Every key of checkpoint.pt and of manifest.json a checkpoint of one optimizer held before optimizers by name.
SINGLE_CHECKPOINT_KEYS = {"epoch", "model_state", "optim_state", "step", "metrics", "scheduler_state"}
SINGLE_MANIFEST_KEYS = {
    "created_at",
    "epoch",
    "extra_keys",
    "files",
    "format",
    "format_version",
    "keyed_by",
    "kind",
    "metrics",
    "model",
    "optimizer",
    "scaler",
    "scheduler",
    "step",
    "versions",
}


def test_a_single_optimizer_checkpoint_is_stored_as_before_and_an_old_reader_refuses_a_named_one(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, scheduler=scheduler)
    located = find_checkpoint(run.info.run_id)
    raw = torch.load(io.BytesIO(bytes(located.read(layout.CHECKPOINT_FILE))), weights_only=True)
    assert set(raw) == SINGLE_CHECKPOINT_KEYS
    assert_same(raw["optim_state"], optimizer.state_dict())
    stored = json.loads(bytes(located.store.read(layout.MANIFEST_FILE)))
    assert set(stored) == SINGLE_MANIFEST_KEYS and stored["format_version"] == 1

    # A manifest exactly as the versions before optimizers by name wrote it loads, into one optimizer.
    def as_before(data: dict[str, Any]) -> None:
        assert set(data) == SINGLE_MANIFEST_KEYS

    tamper_manifest(run.info.run_id, 1, as_before)
    loaded = tracking.load(run.info.run_id, mode="train")
    assert isinstance(loaded.optimizer, torch.optim.Adam)
    assert_same(loaded.optimizer.state_dict(), optimizer.state_dict())

    # A reader that knows format 1 alone refuses a checkpoint of optimizers by name, and says to upgrade.
    gan, optimizers, schedulers = setup()
    with mlflow.start_run(run_id=run.info.run_id):
        tracking.log_checkpoint(gan, optimizers, epoch=2, scheduler=schedulers)
    monkeypatch.setattr(manifest, "NEWEST_VERSION", 1)
    with pytest.raises(
        tracking.IntegrityError, match=r"format_version 2, newer than the 1 this version reads.*upgrade"
    ):
        tracking.load(run.info.run_id, 2)


def test_a_checkpoint_whose_states_do_not_match_its_manifests_names_is_refused(s3_experiment: str) -> None:
    model, optimizers, schedulers = setup()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)

    def one_name_only(data: bytes) -> bytes:
        state = torch.load(io.BytesIO(data), weights_only=True)
        del state["optim_state"]["discriminator"]
        out = io.BytesIO()
        torch.save(state, out)
        return out.getvalue()

    rewrite(run.info.run_id, 1, layout.CHECKPOINT_FILE, one_name_only)
    located = find_checkpoint(run.info.run_id)
    data = bytes(located.store.read(layout.CHECKPOINT_FILE))

    def fix_manifest(manifest_data: dict[str, Any]) -> None:
        manifest_data["files"][layout.CHECKPOINT_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    tamper_manifest(run.info.run_id, 1, fix_manifest)
    with pytest.raises(tracking.IntegrityError, match=r"'optim_state' holds \['generator'\], where its manifest names"):
        tracking.load(run.info.run_id, mode="train")


def test_scheduler_kwargs_by_name_that_are_not_each_a_mapping_are_refused_naming_the_key(s3_experiment: str) -> None:
    model, optimizers, schedulers = setup()
    with mlflow.start_run() as run:
        for kwargs in ({"generator": 3}, {"generator": ["step_size", 2]}):
            with pytest.raises(TypeError, match=r"scheduler_kwargs\['generator'\] must be a mapping"):
                tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers, scheduler_kwargs=kwargs)
        # One optimizer and its scheduler: the kwargs are that scheduler's own.
        with pytest.raises(TypeError, match=r"scheduler_kwargs= must be a mapping of the scheduler's init arguments"):
            tracking.log_checkpoint(
                model, optimizers["generator"], epoch=1, scheduler=schedulers["generator"], scheduler_kwargs=3
            )
    assert tracking.list_checkpoints(run.info.run_id) == []


def test_restore_refuses_schedulers_by_name_without_their_optimizers_as_log_checkpoint_does(
    s3_experiment: str,
) -> None:
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=2, seed=1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)
    into, into_optimizers, into_schedulers = setup(seed=5)
    before = states(into, into_optimizers, into_schedulers)
    # Not a result whose .scheduler is the dict and .schedulers empty: refused, naming what to pass.
    with pytest.raises(TypeError, match=r"scheduler= is a mapping of names, optimizer= is not: pass optimizer="):
        tracking.restore(run.info.run_id, into, None, into_schedulers)
    with pytest.raises(ValueError, match=r"scheduler\['generator'\] drives another optimizer"):
        swapped = {"generator": into_schedulers["discriminator"], "discriminator": into_schedulers["generator"]}
        tracking.restore(run.info.run_id, into, into_optimizers, swapped)
    assert_same(states(into, into_optimizers, into_schedulers), before)  # nothing was loaded


def test_schedulers_by_name_given_for_a_checkpoint_saved_without_schedulers_are_said_to_be_left_out(
    s3_experiment: str,
) -> None:
    model, optimizers, schedulers = setup()
    train(model, optimizers, schedulers, steps=2, seed=1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1)  # the optimizers, no scheduler
    run_id = run.info.run_id
    path = find_checkpoint(run_id).store.describe(layout.CHECKPOINT_FILE)

    into, into_optimizers, into_schedulers = setup(seed=5)
    before = states(into, into_optimizers, into_schedulers)
    with pytest.warns(UserWarning) as said:
        restored = tracking.restore(run_id, into, into_optimizers, into_schedulers)
    (warning,) = [str(w.message) for w in said if "holds no" in str(w.message)]
    assert warning.startswith(f"run {run_id}: checkpoint-epoch-0001 (m-") and path in warning, warning
    assert "holds no scheduler state" in warning and "tracking.restore" in warning and "scheduler=None" in warning
    assert "optimizer state" not in warning and restored.optimizers == into_optimizers
    assert_same(states(into, into_optimizers, {})["optimizers"], states(model, optimizers, {})["optimizers"])
    assert_same({n: s.state_dict() for n, s in into_schedulers.items()}, before["schedulers"])  # left as they are

    def halving(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    with pytest.warns(UserWarning, match=r"holds no scheduler state .*given to tracking.load is not used"):
        loaded = tracking.load(run_id, mode="train", scheduler={"generator": halving})
    assert sorted(loaded.optimizers) == ["discriminator", "generator"] and loaded.schedulers == {}
