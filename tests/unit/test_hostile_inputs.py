"""Hostile and malformed inputs on the reading side: manifests, class paths, run tags, stray objects.

Each one ends in a :class:`tracking.TrackingError` that names the run and the path (or a
warning where the input is only a hint, such as a pointer tag), never in a raw exception,
and never runs code a manifest names.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.test_loader import checkpoint_model, rewrite, tamper_manifest
from tracking import layout, spec
from tracking.audit import verify
from tracking.config import TrackingConfig
from tracking.manifest import MAX_FILES, Manifest
from tracking.rebuild import MODEL_HINT
from tracking.storage import open_store

MODEL_ID = f"m-{'0' * 32}"


def checkpoint_of(run_id: str, epoch: int) -> str:
    """The logged model ID of the run's checkpoint of ``epoch`` (found without reading its manifest)."""
    return str(checkpoint_model(run_id, epoch).model_id)


# ------------------------------------------------------------ no import because a manifest says so


@pytest.fixture
def sidefx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module on sys.path that writes a marker file when imported, and defines an nn.Module."""
    name = f"sidefx_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "import torch\n\nclass Anything(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_a_module_a_manifest_names_is_not_imported(sidefx: tuple[str, Path]) -> None:
    name, marker = sidefx
    with pytest.raises(tracking.NotFoundError) as caught:
        spec.import_class(f"{name}:Anything", "model", run_id="r123", hint=MODEL_HINT)
    message = str(caught.value)
    assert "run r123" in message and f"{name}:Anything" in message
    assert f"import {name}" in message and "pass model=" in message
    assert not marker.exists() and name not in sys.modules


def test_the_zen_of_python_is_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    if "this" in sys.modules:
        pytest.skip("something in this process imported `this` already")
    with pytest.raises(tracking.NotFoundError, match=r"this:s.*not imported"):
        spec.import_class("this:s", "model", run_id="r1", hint=MODEL_HINT)
    assert capsys.readouterr() == ("", "")
    assert "this" not in sys.modules


def test_a_class_of_an_imported_module_loads(sidefx: tuple[str, Path]) -> None:
    name, marker = sidefx
    module = __import__(name)  # the user's own import, the documented way
    assert marker.exists()
    assert spec.import_class(f"{name}:Anything", "model", run_id="r1", hint=MODEL_HINT) is module.Anything


@pytest.fixture
def lazy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An imported package whose ``__getattr__`` imports a submodule on first access, as many do."""
    name = f"lazypkg_{uuid.uuid4().hex}"
    marker = tmp_path / "submodule-imported"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(
        "import importlib\n\ndef __getattr__(attr):\n    return importlib.import_module(f'.{attr}', __name__)\n"
    )
    (tmp_path / name / "sub.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "import torch\n\nclass Anything(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)
    yield name, marker
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        sys.modules.pop(module)


def test_a_package_getattr_does_not_import_the_submodule_a_manifest_names(lazy_package: tuple[str, Path]) -> None:
    name, marker = lazy_package
    with pytest.raises(tracking.NotFoundError, match=rf"run r1: module '{name}' has no 'sub.Anything'"):
        spec.import_class(f"{name}:sub.Anything", "model", run_id="r1", hint=MODEL_HINT)
    assert not marker.exists() and f"{name}.sub" not in sys.modules
    __import__(f"{name}.sub")  # the user's own import: then the class resolves
    assert spec.import_class(f"{name}:sub.Anything", "model", run_id="r1", hint=MODEL_HINT).__name__ == "Anything"


def test_mlflow_lazy_flavors_are_not_imported_by_a_class_path() -> None:
    # mlflow's flavors are LazyLoader entries of its __dict__: touching one imports the flavor.
    code = (
        "import sys, mlflow\n"
        "from tracking import spec, errors\n"
        "try:\n"
        "    spec.import_class('mlflow:sklearn.Anything', 'model', run_id='r1', hint='')\n"
        "except errors.NotFoundError as exc:\n"
        "    print('refused:', exc)\n"
        "print('imported' if 'mlflow.sklearn' in sys.modules else 'not imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "refused: run r1: module 'mlflow' has no 'sklearn.Anything'" in done.stdout
    assert done.stdout.strip().endswith("not imported")


def test_torch_modules_and_allowed_modules_may_be_imported(sidefx: tuple[str, Path]) -> None:
    name, marker = sidefx
    scaler = spec.import_class("torch.amp.grad_scaler:GradScaler", "scaler", run_id="r1", hint="")
    assert scaler is torch.amp.GradScaler
    cls = spec.import_class(f"{name}:Anything", "model", run_id="r1", hint="", allow_import=[name])
    assert cls.__name__ == "Anything" and marker.exists()


@pytest.mark.parametrize("path", [None, 7, ["os:system"], "no-colon", ":Q", "m:"])
def test_class_paths_that_are_not_module_qualname(path: Any) -> None:
    with pytest.raises(tracking.UnsafeClassError, match="run r1"):
        spec.import_class(path, "model", run_id="r1", hint="")


def test_load_refuses_a_manifest_naming_an_unimported_module(experiment: str, sidefx: tuple[str, Path]) -> None:
    name, marker = sidefx
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)

    def point_elsewhere(manifest: dict[str, Any]) -> None:
        manifest["model"]["class"] = f"{name}:Anything"

    tamper_manifest(run.info.run_id, 1, point_elsewhere)
    with pytest.raises(tracking.NotFoundError, match=rf"run {run.info.run_id}.*import {name}"):
        tracking.load(run.info.run_id)
    assert not marker.exists()
    assert tracking.load(run.info.run_id, model=Model(6)).epoch == 1


def test_recorded_arguments_a_constructor_refuses_are_an_error_not_a_crash(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)

    def negative_lr(manifest: dict[str, Any]) -> None:
        manifest["optimizer"]["defaults"]["lr"] = -1.0  # SGD raises ValueError

    tamper_manifest(run.info.run_id, 1, negative_lr)
    with pytest.raises(tracking.NotFoundError, match=r"SGD refused the recorded arguments.*ValueError"):
        tracking.load(run.info.run_id)


# ------------------------------------------------------------ malformed manifests


def valid_manifest() -> dict[str, Any]:
    return {
        "format_version": 1,
        "kind": "checkpoint",
        "files": {"checkpoint.pt": {"size": 10, "sha256": "a" * 64}},
        "model": {"class": "pipelines.models:Model", "init_kwargs": {"n_input_features": 6}},
        "epoch": 1,
        "step": 10,
        "metrics": {"val_loss": 0.5},
        "optimizer": {"class": "torch.optim.sgd:SGD", "defaults": {"lr": 0.1}, "param_groups": [{"params": ["w"]}]},
        "scheduler": None,
        "scaler": None,
        "extra_keys": [],
        "format": "torch",
        "versions": {"torch": "2"},
        "created_at": "2024-01-01T00:00:00+00:00",
    }


def edit(change: Callable[[dict[str, Any]], object]) -> bytes:
    data = valid_manifest()
    change(data)
    return json.dumps(data).encode()


MALFORMED: dict[str, bytes] = {
    "missing model class": edit(lambda d: d["model"].pop("class")),
    "model class not a string": edit(lambda d: d["model"].update({"class": 3})),
    "model not an object": edit(lambda d: d.update(model="pipelines.models:Model")),
    "no model": edit(lambda d: d.pop("model")),
    "init_kwargs a list": edit(lambda d: d["model"].update(init_kwargs=[6])),
    "size -1": edit(lambda d: d["files"]["checkpoint.pt"].update(size=-1)),
    "size a string": edit(lambda d: d["files"]["checkpoint.pt"].update(size="10")),
    "size a bool": edit(lambda d: d["files"]["checkpoint.pt"].update(size=True)),
    "size a float": edit(lambda d: d["files"]["checkpoint.pt"].update(size=10.0)),
    "sha256 too short": edit(lambda d: d["files"]["checkpoint.pt"].update(sha256="abc")),
    "sha256 not hex": edit(lambda d: d["files"]["checkpoint.pt"].update(sha256="z" * 64)),
    "sha256 missing": edit(lambda d: d["files"]["checkpoint.pt"].pop("sha256")),
    "files a list": edit(lambda d: d.update(files=[["checkpoint.pt", 10]])),
    "files empty": edit(lambda d: d.update(files={})),
    "file entry a string": edit(lambda d: d["files"].update({"checkpoint.pt": "10"})),
    "file name with a path": edit(lambda d: d["files"].update({"../../etc/passwd": {"size": 1, "sha256": "a" * 64}})),
    "metrics a string": edit(lambda d: d.update(metrics="val_loss=0.5")),
    "metric a string": edit(lambda d: d.update(metrics={"val_loss": "low"})),
    "metric a bool": edit(lambda d: d.update(metrics={"val_loss": True})),
    "metric beyond floats": edit(lambda d: d.update(metrics={"val_loss": 10**400})),
    "metric infinite": edit(lambda d: d.update(metrics={"val_loss": 1e999})),
    "metric NaN": json.dumps(valid_manifest()).replace("0.5", "NaN").encode(),
    "a float beyond range in init_kwargs": json.dumps(valid_manifest()).replace(": 6}", ": 1e999}").encode(),
    "epoch a string": edit(lambda d: d.update(epoch="1")),
    "epoch negative": edit(lambda d: d.update(epoch=-1)),
    "epoch a float": edit(lambda d: d.update(epoch=1.5)),
    "checkpoint without epoch": edit(lambda d: d.update(epoch=None)),
    "step a list": edit(lambda d: d.update(step=[1])),
    "param_groups an object": edit(lambda d: d["optimizer"].update(param_groups={"params": ["w"]})),
    "param group without params": edit(lambda d: d["optimizer"].update(param_groups=[{}])),
    "param names not strings": edit(lambda d: d["optimizer"].update(param_groups=[{"params": [1]}])),
    "optimizer defaults a list": edit(lambda d: d["optimizer"].update(defaults=[0.1])),
    "optimizer without class": edit(lambda d: d["optimizer"].pop("class")),
    "scheduler a string": edit(lambda d: d.update(scheduler="StepLR")),
    "scaler class a number": edit(lambda d: d.update(scaler={"class": 1})),
    "unknown kind": edit(lambda d: d.update(kind="pickle")),
    "unknown format": edit(lambda d: d.update(format="pickle")),
    "extra_keys a string": edit(lambda d: d.update(extra_keys="rng")),
    "versions with numbers": edit(lambda d: d.update(versions={"torch": 2})),
    "created_at a number": edit(lambda d: d.update(created_at=0)),
    "format_version a bool": edit(lambda d: d.update(format_version=True)),
    "format_version 0": edit(lambda d: d.update(format_version=0)),
    "optimizers a list": edit(lambda d: d.update(optimizer=None, optimizers=[d["optimizer"]])),
    "optimizers empty": edit(lambda d: d.update(optimizer=None, optimizers={})),
    "optimizers beside an optimizer": edit(lambda d: d.update(optimizers={"g": d["optimizer"]})),
    "a named optimizer without class": edit(lambda d: d.update(optimizer=None, optimizers={"g": {"defaults": {}}})),
    "a named optimizer's groups an object": edit(
        lambda d: d.update(optimizer=None, optimizers={"g": {**d["optimizer"], "param_groups": {}}})
    ),
    "schedulers of no optimizer": edit(
        lambda d: d.update(
            optimizer=None,
            optimizers={"g": d["optimizer"]},
            schedulers={"d": {"class": "torch.optim.lr_scheduler:StepLR", "init_kwargs": {}}},
        )
    ),
    "a JSON list": b"[1, 2]",
    "not UTF-8": b"\xff\xfe{",
    "100k-deep JSON": b"[" * 100_000 + b"]" * 100_000,
    "deep init_kwargs": edit(lambda d: d["model"].update(init_kwargs=json.loads('{"a":' * 500 + "1" + "}" * 500))),
    "an integer of 5000 digits": edit(lambda d: d.update(step=int("9" * 4000))).replace(b"9" * 4000, b"9" * 5000),
    "too many files": edit(
        lambda d: d.update(files={f"f{i}": {"size": 0, "sha256": "a" * 64} for i in range(MAX_FILES + 1)})
    ),
}


def test_a_valid_manifest_parses() -> None:
    manifest = Manifest.from_json(json.dumps(valid_manifest()).encode(), where="run r1: m.json")
    assert manifest.files["checkpoint.pt"].size == 10 and manifest.metrics == {"val_loss": 0.5}


def test_a_valid_manifest_of_optimizers_by_name_parses() -> None:
    data = valid_manifest()
    scheduler = {"class": "torch.optim.lr_scheduler:StepLR", "init_kwargs": {"step_size": 1}}
    data.update(format_version=2, optimizer=None, optimizers={"g": data["optimizer"]}, schedulers={"g": scheduler})
    manifest = Manifest.from_json(json.dumps(data).encode(), where="run r1: m.json")
    assert manifest.optimizers == {"g": valid_manifest()["optimizer"]} and manifest.schedulers == {"g": scheduler}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(tracking.IntegrityError) as caught:
        Manifest.from_json(raw, where=f"run r1, checkpoint-epoch-0001 ({MODEL_ID}): manifest.json")
    message = str(caught.value)
    assert message.startswith(f"run r1, checkpoint-epoch-0001 ({MODEL_ID}): manifest.json ")
    assert len(message) < 1000  # a hostile manifest's megabytes are not echoed back


def test_load_and_verify_report_a_malformed_manifest_and_listings_leave_it_out(
    experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1, metrics={"val_loss": 0.5})
    run_id = run.info.run_id
    model_id = checkpoint_of(run_id, 1)
    tamper_manifest(run_id, 1, lambda m: m.update(metrics="val_loss=0.5"))
    where = rf"run {run_id}, checkpoint-epoch-0001 \({model_id}\): manifest\.json"
    for call in (
        lambda: tracking.load(run_id),
        lambda: tracking.load(f"models:/{model_id}"),
        lambda: tracking.load_model(run_id),
    ):
        with pytest.raises(tracking.IntegrityError, match=rf"{where} is malformed: metrics"):
            call()
    # A listing leaves the bad one out and names it (tests/unit/test_listing.py: the healthy ones stay).
    with caplog.at_level(logging.WARNING, logger="tracking"):
        assert tracking.list_checkpoints(run_id) == []
    assert any(model_id in r.getMessage() and "malformed: metrics" in r.getMessage() for r in caplog.records)
    report = verify(run_id)
    path = f"checkpoint-epoch-0001 ({model_id})/manifest.json"
    assert list(report) == [path] and "metrics" in str(report[path])


@pytest.mark.parametrize("size", [-1, 10**11])
def test_a_wrong_file_size_is_an_integrity_error_without_allocating_it(experiment: str, size: int) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    model_id = checkpoint_of(run.info.run_id, 1)
    tamper_manifest(run.info.run_id, 1, lambda m: m["files"]["checkpoint.pt"].update(size=size))
    # The manifest's own check (-1) names the manifest; the read (10**11) names the object.
    with pytest.raises(tracking.IntegrityError, match=rf"run {run.info.run_id}, checkpoint-epoch-0001 \({model_id}\)"):
        tracking.load(run.info.run_id)


# ------------------------------------------------------------ stray objects and bad tags


@pytest.mark.parametrize(("name", "epoch_param"), [("checkpoint-epoch-¹", None), ("checkpoint-epoch-x", "١٢")])
def test_a_stray_checkpoint_model_with_a_non_ascii_epoch_is_ignored(
    experiment: str, name: str, epoch_param: str | None
) -> None:
    assert layout.key_of("checkpoint-epoch-¹") is None and layout.key_of("checkpoint-epoch-١٢") is None
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    run_id = run.info.run_id
    client = MlflowClient()
    # Someone else's logged model in the run, typed as a checkpoint, READY, with a manifest.
    stray = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id,
        name=name,
        source_run_id=run_id,
        params={} if epoch_param is None else {layout.PARAM_EPOCH: epoch_param},
        model_type=layout.CHECKPOINT_MODEL_TYPE,
    )
    open_store(stray.artifact_location, TrackingConfig.from_env()).write_bytes(
        layout.MANIFEST_FILE, json.dumps(valid_manifest()).encode()
    )
    client.finalize_logged_model(stray.model_id, "READY")
    client.delete_tag(run_id, layout.TAG_LATEST)  # latest by search, where the stray could show
    assert [m.epoch for m in tracking.list_checkpoints(run_id)] == [1]
    assert tracking.load(run_id).epoch == 1
    with pytest.raises(tracking.NotFoundError, match="no committed checkpoint for epoch 12"):
        tracking.load(run_id, 12)
    assert list(verify(run_id)) == [f"checkpoint-epoch-0001 ({checkpoint_of(run_id, 1)})/checkpoint.pt"]


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", ""])
def test_a_malformed_best_value_tag_means_nothing_to_beat(experiment: str, value: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"loss": 0.5}, monitor="loss")
        MlflowClient().set_tag(run.info.run_id, layout.TAG_BEST_VALUE, value)
        with pytest.warns(RuntimeWarning, match=rf"{layout.TAG_BEST_VALUE}=.*not a finite number"):
            tracking.log_checkpoint(model, epoch=2, metrics={"loss": 0.9}, monitor="loss")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[layout.TAG_BEST] == checkpoint_of(run.info.run_id, 2) and tags[layout.TAG_BEST_VALUE] == "0.9"


@pytest.mark.parametrize("which", ["latest", "best"])
@pytest.mark.parametrize("value", ["../../etc", "state_dict", f" {MODEL_ID}", "M-" + "0" * 32])
def test_a_pointer_tag_naming_no_model_id_falls_back_to_the_search(experiment: str, which: str, value: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"loss": 0.2}, monitor="loss")
        tracking.log_checkpoint(model, epoch=2, metrics={"loss": 0.9}, monitor="loss")
        tracking.log_state_dict(model)
    tag = layout.TAG_LATEST if which == "latest" else layout.TAG_BEST
    MlflowClient().set_tag(run.info.run_id, tag, value)
    with pytest.warns(RuntimeWarning, match=rf"{tag}=.*is not a logged model ID"):
        loaded = tracking.load(run.info.run_id, which)
    assert loaded.epoch == (2 if which == "latest" else 1)


@pytest.mark.parametrize("which", ["latest", "best"])
def test_a_pointer_tag_is_followed_only_to_a_committed_checkpoint_of_its_own_run(experiment: str, which: str) -> None:
    model = Model(6)
    with mlflow.start_run() as other:
        tracking.log_checkpoint(model, epoch=7, metrics={"loss": 0.01}, monitor="loss")
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"loss": 0.2}, monitor="loss")
        tracking.log_checkpoint(model, epoch=2, metrics={"loss": 0.9}, monitor="loss")
        # a logged model of the run that is no checkpoint (requirements given: MLflow's inference takes 10+ s)
        tracking.log_model(model, pip_requirements=["torch"])
    run_id = run.info.run_id
    tag = layout.TAG_LATEST if which == "latest" else layout.TAG_BEST
    client = MlflowClient()
    expected = 2 if which == "latest" else 1
    experiment_id = client.get_run(run_id).info.experiment_id
    (whole,) = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{layout.MODEL_NAME}'"
    )
    failed = client.create_logged_model(
        experiment_id=experiment_id,
        name=layout.checkpoint_name(3),
        source_run_id=run_id,
        params={layout.PARAM_EPOCH: "3"},
        model_type=layout.CHECKPOINT_MODEL_TYPE,
    )
    client.finalize_logged_model(failed.model_id, "FAILED")
    # A model ID of another run's checkpoint, of a deleted model, of a FAILED one, of a whole model:
    # none is this run's committed checkpoint, so the search answers.
    for value in (checkpoint_of(other.info.run_id, 7), MODEL_ID, failed.model_id, whole.model_id):
        client.set_tag(run_id, tag, value)
        loaded = tracking.load(run_id, which)
        assert (loaded.epoch, loaded.run_id) == (expected, run_id), value
    # One of its own committed checkpoints is followed, whichever it is: the tag is the pointer.
    first = checkpoint_of(run_id, 1)
    client.set_tag(run_id, layout.TAG_LATEST, first)
    loaded = tracking.load(run_id)
    assert (loaded.epoch, loaded.model_id, loaded.path) == (1, first, f"checkpoint-epoch-0001 ({first})")


def test_a_malformed_mode_tag_ranks_as_min_with_a_warning(experiment: str) -> None:
    with mlflow.start_run() as run:
        for epoch, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
            tracking.log_checkpoint(Model(6), epoch=epoch, metrics={"loss": loss}, monitor="loss")
    client = MlflowClient()
    client.delete_tag(run.info.run_id, layout.TAG_BEST)
    client.set_tag(run.info.run_id, layout.TAG_MODE, "sideways")
    with pytest.warns(RuntimeWarning, match=rf"{layout.TAG_MODE}='sideways'"):
        assert tracking.load(run.info.run_id, "best").epoch == 2


def test_a_tampered_file_entry_does_not_make_verify_read_elsewhere(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)

    def add_foreign(manifest: dict[str, Any]) -> None:
        manifest["files"]["../../other/checkpoint.pt"] = copy.deepcopy(manifest["files"]["checkpoint.pt"])

    tamper_manifest(run.info.run_id, 1, add_foreign)
    path = f"checkpoint-epoch-0001 ({checkpoint_of(run.info.run_id, 1)})/manifest.json"
    report = verify(run.info.run_id)
    assert list(report) == [path]
    assert "not a plain file name" in str(report[path])


def test_an_empty_manifest_object_is_an_integrity_error(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    rewrite(run.info.run_id, 1, "manifest.json", lambda data: b"")
    with pytest.raises(tracking.IntegrityError, match="not valid JSON"):
        tracking.load(run.info.run_id)


class _Evil:
    """Unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_torchs_advice_to_unpickle_it(s3_experiment: str, tmp_path: Path) -> None:
    import hashlib
    import io

    from tests.unit.test_loader import rewrite

    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model_state": {}, "hook": _Evil(marker)}, buffer)
    raw = buffer.getvalue()
    rewrite(run.info.run_id, 1, layout.CHECKPOINT_FILE, lambda _: raw)
    digest = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    tamper_manifest(run.info.run_id, 1, lambda m: m["files"].update({layout.CHECKPOINT_FILE: digest}))

    with pytest.raises(tracking.TrackingError) as caught:
        tracking.load(run.info.run_id)
    (problem,) = verify(run.info.run_id).failures.values()
    for message in (str(caught.value), problem):
        assert "GLOBAL posix.system" in message or "GLOBAL os.system" in message
        assert "weights_only" not in message.replace("weights_only=True", "") and "Re-running" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not marker.exists()


@pytest.mark.parametrize(("rank", "said"), [("0", 3), ("3", 0)])
def test_damaged_pointer_and_mode_tags_are_said_once_for_a_job_by_rank_0(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch, rank: str, said: int
) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"loss": 0.2}, monitor="loss")
        tracking.log_checkpoint(model, epoch=2, metrics={"loss": 0.9}, monitor="loss")
    run_id = run.info.run_id
    client = MlflowClient()
    client.set_tag(run_id, layout.TAG_LATEST, "state_dict")
    client.set_tag(run_id, layout.TAG_BEST, "state_dict")
    client.set_tag(run_id, layout.TAG_MODE, "sideways")
    # Every rank under torchrun loads alike, before or without a process group: RANK says which one speaks.
    monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracking.load(run_id, "latest").epoch == 2
        assert tracking.load(run_id, "best").epoch == 1
    damaged = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and run_id in str(w.message)]
    assert len(damaged) == said, damaged  # was: 3 on every rank, 8 ranks 24 lines
