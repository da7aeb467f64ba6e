"""What a save commits, and when: loadable payloads only, pointers that never go backwards,
and failures (of the tracking server, of a background save) that are never silent."""

from __future__ import annotations

import argparse
import datetime
import decimal
import enum
import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking import audit, commit, payload
from tracking.config import TrackingConfig
from tracking.layout import TAG_BEST, TAG_LATEST
from tracking.manifest import Manifest
from tracking.run import open_run

REPO = Path(__file__).resolve().parents[2]


class Colour(enum.Enum):
    RED = 1


class Custom:
    pass


def self_referencing() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def deeply_nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def logged_models(run_id: str) -> list[Any]:
    """Every (not deleted) logged model of the run, whatever its status, oldest first."""
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    return list(
        client.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": True}],
        )
    )


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.float64(0.5), "numpy.float64"),
        (np.arange(3), "numpy.ndarray"),
        (datetime.datetime(2026, 1, 1), "datetime"),
        (pathlib.Path("/data"), "Path"),
        (argparse.Namespace(lr=0.1), "Namespace"),
        (decimal.Decimal("0.1"), "Decimal"),
        (Colour.RED, "Colour"),
        (Custom(), "Custom"),
        ({"history": [1.0, np.float32(2.0)]}, r"extra\['notes'\]\['history'\]\[1\]"),
        (self_referencing(), "contains itself"),
        (deeply_nested(200), "nested more than"),
    ],
)
def test_extra_values_that_would_not_load_are_refused_before_anything_is_stored(
    experiment: str, value: object, match: str
) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")
        with pytest.raises(ValueError, match=match):
            tracking.log_checkpoint(
                model, epoch=2, metrics={"val_loss": 0.1}, monitor="val_loss", extra={"notes": value}
            )
        with tracking.Checkpointer(keep_last=1, monitor="val_loss") as checkpointer:
            with pytest.raises(ValueError, match=match):
                checkpointer.save(model, epoch=3, metrics={"val_loss": 0.1}, extra={"notes": value})
    (first,) = tracking.list_checkpoints(run.info.run_id)
    assert first.epoch == 1
    assert (tags(run.info.run_id)[TAG_LATEST], tags(run.info.run_id)[TAG_BEST]) == (first.model_id,) * 2
    # Refused before a logged model was even created: the run has exactly one.
    assert [m.model_id for m in logged_models(run.info.run_id)] == [first.model_id]


def test_plain_extra_values_round_trip(experiment: str) -> None:
    extra = {
        "global_step": 7,
        "history": [0.5, 0.25],
        "config": {"lr": 0.1, "name": "seed", "layers": (6, 1), "tags": {"a"}},
        "noise": torch.randn(3),
        "none": None,
        "blob": b"\x00\x01",
    }
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1, extra=extra)
    loaded = tracking.load(run.info.run_id).extra
    assert torch.equal(loaded.pop("noise"), extra.pop("noise"))
    assert loaded == extra


def test_a_state_dict_that_would_not_load_is_refused(experiment: str) -> None:
    class WithExtraState(Model):
        def get_extra_state(self) -> object:
            return np.float64(1.0)

        def set_extra_state(self, state: object) -> None:
            pass

    with mlflow.start_run(), pytest.raises(ValueError, match=r"numpy\.float64"):
        tracking.log_checkpoint(WithExtraState(6), epoch=1)


def test_check_loadable_accepts_what_weights_only_loading_reads() -> None:
    import io

    value = {"t": torch.ones(2), "s": torch.Size([2]), "d": torch.float16, "dev": torch.device("cpu"), "c": 1j}
    payload.check_loadable(value, "value")
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["s"] == torch.Size([2])


def test_a_tracking_server_failure_while_moving_tags_commits_nothing(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")

        def dead_server(self: object, *args: object, **kwargs: object) -> None:
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed: Connection refused")

        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "log_batch", dead_server)
            with pytest.raises(tracking.StorageError, match=r"tracking server failed .* epoch 2 was not committed"):
                tracking.log_checkpoint(model, epoch=2, metrics={"val_loss": 0.1}, monitor="val_loss")
    (first,) = tracking.list_checkpoints(run.info.run_id)
    assert first.epoch == 1
    assert tags(run.info.run_id)[TAG_LATEST] == first.model_id
    assert tracking.load(run.info.run_id, "best").epoch == 1
    # The attempt is a logged model of its own, FAILED and without a manifest.
    statuses = {m.name: str(m.status) for m in logged_models(run.info.run_id)}
    assert statuses == {"checkpoint-epoch-0001": "READY", "checkpoint-epoch-0002": "FAILED"}


def test_a_tracking_server_failure_before_ready_leaves_nothing_loadable(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        created: list[str] = []
        real_create = MlflowClient.create_logged_model

        def create(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
            made = real_create(self, *args, **kwargs)
            created.append(made.model_id)
            return made

        def dead_server(self: object, *args: object, **kwargs: object) -> None:
            raise MlflowException("API request to endpoint /api/2.0/mlflow/logged-models failed: Connection refused")

        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "create_logged_model", create)
            # The server dies between the manifest and READY: marking FAILED fails as well.
            patch.setattr(MlflowClient, "finalize_logged_model", dead_server)
            with pytest.raises(tracking.StorageError) as caught:
                tracking.log_checkpoint(model, epoch=2)
    message = str(caught.value)
    assert "marked FAILED" not in message
    assert "left PENDING without a manifest" in message and "tracking verify --clean" in message
    (attempt,) = created
    # The model ID the error names does not load: its manifest is gone, whatever its status.
    with pytest.raises(tracking.NotFoundError, match="has no manifest"):
        tracking.load(f"models:/{attempt}")
    assert tracking.load(run.info.run_id).epoch == 1
    assert [str(x) for x in audit.verify(run.info.run_id).leftovers] == [
        f"checkpoint-epoch-0002 ({attempt}) (a logged model whose save never committed)"
    ]


def test_a_slow_writer_never_moves_latest_back_or_best_to_a_worse_checkpoint(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A starts epoch 5 (worse), writer B commits epoch 6 (better) while A uploads; A ends last."""
    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model, epoch=4, metrics={"val_loss": 0.9}, monitor="val_loss", run_id=run_id)
        from tracking import payload as payload_module

        real_call = payload_module.TorchSave.__call__
        overtaken = []

        def slow_save(self: payload_module.TorchSave, stream: Any) -> None:
            if self.value["epoch"] == 5 and not overtaken:
                overtaken.append(True)
                tracking.log_checkpoint(model, epoch=6, metrics={"val_loss": 0.1}, monitor="val_loss", run_id=run_id)
            real_call(self, stream)

        monkeypatch.setattr(payload_module.TorchSave, "__call__", slow_save)
        tracking.log_checkpoint(model, epoch=5, metrics={"val_loss": 0.5}, monitor="val_loss", run_id=run_id)
    assert overtaken
    listed = tracking.list_checkpoints(run_id)
    assert [m.epoch for m in listed] == [4, 5, 6]
    assert tags(run_id)[TAG_LATEST] == listed[2].model_id
    assert tags(run_id)[TAG_BEST] == listed[2].model_id


def test_a_failed_background_save_fails_the_next_save_of_any_kind(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracking import checkpoint

    model = Model(6)
    real_commit = checkpoint.commit_checkpoint

    def failing_commit(handle: Any, snapshot: Any, *args: Any, **kwargs: Any) -> Any:
        if snapshot.manifest.epoch == 2:
            raise tracking.StorageError("injected: upload of epoch 2 failed")
        return real_commit(handle, snapshot, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "commit_checkpoint", failing_commit)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, blocking=False).result()
        failed = tracking.log_checkpoint(model, epoch=2, blocking=False)
        with pytest.raises(tracking.StorageError):
            failed.result(timeout=60)
        with pytest.raises(tracking.StorageError, match="injected"):
            tracking.log_checkpoint(model, epoch=3)  # synchronous, and still told
        tracking.log_checkpoint(model, epoch=4)  # reported once: saving goes on
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1, 4]


def test_a_background_failure_found_only_at_exit_makes_the_process_fail(tracking_store: str, tmp_path: Path) -> None:
    experiment_id = mlflow.create_experiment("exit-fail", artifact_location=(tmp_path / "art").as_uri())
    run = MlflowClient().create_run(experiment_id)
    script = textwrap.dedent(
        f"""
        import time, tracking
        from pipelines.models import Model
        from tracking import checkpoint

        def failing_commit(handle, snapshot, *args, **kwargs):
            time.sleep(0.5)  # still uploading when the script ends
            raise tracking.StorageError("injected: the store went away")
        checkpoint.commit_checkpoint = failing_commit

        tracking.log_checkpoint(Model(6), epoch=1, run_id={run.info.run_id!r}, blocking=False)
        print("script done", flush=True)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_store},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "script done" in child.stdout
    assert child.returncode == 1, child.stderr[-3000:]
    assert "error: a background checkpoint save failed: StorageError: injected: the store went away" in child.stderr


def test_verify_catches_an_intact_checkpoint_that_does_not_load(experiment: str) -> None:
    """What an older version could commit: bytes that match their manifest but hold a numpy value."""
    import io
    import json

    from tracking import audit, layout
    from tracking.selection import find_checkpoint

    with mlflow.start_run() as run:
        first = tracking.log_checkpoint(Model(6), epoch=1)
        second = tracking.log_checkpoint(Model(6), epoch=2)
    assert isinstance(first, tracking.LoggedCheckpoint) and isinstance(second, tracking.LoggedCheckpoint)
    located = find_checkpoint(run.info.run_id, 2)
    store = located.store
    buffer = io.BytesIO()
    torch.save({"epoch": 2, "model_state": {}, "lr": np.float64(0.1)}, buffer)
    stored = store.write_bytes(located.path(layout.CHECKPOINT_FILE), buffer.getvalue())
    manifest = json.loads(bytes(store.read(located.path(layout.MANIFEST_FILE))))
    manifest["files"][layout.CHECKPOINT_FILE] = {"size": stored.size, "sha256": stored.sha256}
    store.write_bytes(located.path(layout.MANIFEST_FILE), json.dumps(manifest).encode())

    report = audit.verify(run.info.run_id)
    assert report[f"checkpoint-epoch-0001 ({first.model_id})/{layout.CHECKPOINT_FILE}"] is None
    problem = report[f"checkpoint-epoch-0002 ({second.model_id})/{layout.CHECKPOINT_FILE}"]
    assert problem is not None and "does not load with torch.load(weights_only=True)" in problem


def test_a_relog_is_a_new_model_and_the_old_one_goes_only_once_it_committed(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracking import audit

    model = Model(6)
    real_call = payload.TorchSave.__call__
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        old = tracking.log_checkpoint(model, epoch=1)
        assert isinstance(old, tracking.LoggedCheckpoint)
        original = model.linear.weight.detach().clone()
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        during: list[tracking.LoadedCheckpoint] = []

        def upload_and_look(self: payload.TorchSave, stream: Any) -> None:
            during.append(tracking.load(run_id, checkpoint=1))  # while the new data uploads
            real_call(self, stream)

        with monkeypatch.context() as patch:
            patch.setattr(payload.TorchSave, "__call__", upload_and_look)
            new = tracking.log_checkpoint(model, epoch=1)
    assert isinstance(new, tracking.LoggedCheckpoint)
    assert new.model_id != old.model_id
    # Until the new model committed, epoch 1 was the old one, whole.
    assert [d.model_id for d in during] == [old.model_id]
    assert torch.equal(during[0].model.linear.weight, original)
    # Once it committed, the tags name it and the old one is deleted, files and model.
    assert tags(run_id)[TAG_LATEST] == new.model_id
    assert [m.model_id for m in logged_models(run_id)] == [new.model_id]
    assert [c.model_id for c in tracking.list_checkpoints(run_id)] == [new.model_id]
    with pytest.raises(tracking.NotFoundError):
        tracking.load(f"models:/{old.model_id}")
    loaded = tracking.load(run_id, checkpoint=1)
    assert loaded.model_id == new.model_id and torch.equal(loaded.model.linear.weight, model.linear.weight)
    report = audit.verify(run_id)
    assert not report.failures and not report.leftovers


def test_a_failed_relog_keeps_the_old_checkpoint(experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracking import audit

    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model, epoch=1)
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        kept = tracking.log_checkpoint(model, epoch=1)  # re-logged: replaces the first
        assert isinstance(kept, tracking.LoggedCheckpoint)
        relogged = model.linear.weight.detach().clone()
        with torch.no_grad():
            model.linear.weight.add_(1.0)

        def dead_server(self: object, *args: object, **kwargs: object) -> None:
            raise MlflowException("Connection refused")

        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "log_batch", dead_server)
            with pytest.raises(tracking.StorageError, match="not committed"):
                tracking.log_checkpoint(model, epoch=1)
    loaded = tracking.load(run_id, checkpoint=1)
    assert loaded.model_id == kept.model_id and torch.equal(loaded.model.linear.weight, relogged)
    assert tracking.load(run_id).model_id == kept.model_id
    assert tags(run_id)[TAG_LATEST] == kept.model_id
    # The failed attempt is a FAILED model without files that verify reports as a leftover.
    models = logged_models(run_id)
    assert [str(m.status) for m in models] == ["READY", "FAILED"] and models[0].model_id == kept.model_id
    report = audit.verify(run_id)
    assert not report.failures
    assert [leftover.kind for leftover in report.leftovers] == [audit.NOT_COMMITTED_MODEL]
    assert models[1].model_id in report.leftovers[0].path


class Killed(BaseException):
    """What SIGKILL leaves: the save stops where it is, and none of its error handling runs."""


def test_a_save_killed_after_ready_is_replaced_by_the_resumed_jobs_save_of_that_epoch(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracking import replacement
    from tracking.run import RunHandle

    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        first = tracking.log_checkpoint(model, epoch=1)
    assert isinstance(first, tracking.LoggedCheckpoint)
    # Killed once its epoch 2 is READY, before the run's tags name it: a committed model no tag names.
    with monkeypatch.context() as patch:
        patch.setattr(RunHandle, "set_tags", lambda *args, **kwargs: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            tracking.log_checkpoint(model, epoch=2, run_id=run_id)
    dead = logged_models(run_id)[-1]
    assert str(dead.status) == "READY" and tags(run_id)[TAG_LATEST] == first.model_id

    # The resumed job, a new process, trains epoch 2 again and saves it.
    monkeypatch.setattr(replacement, "_committed_here", set())
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    again = tracking.log_checkpoint(model, epoch=2, run_id=run_id)
    assert isinstance(again, tracking.LoggedCheckpoint)
    assert [(m.name, m.model_id) for m in logged_models(run_id)] == [
        ("checkpoint-epoch-0001", first.model_id),
        ("checkpoint-epoch-0002", again.model_id),
    ]
    assert tracking.load(run_id).model_id == again.model_id
    assert not audit.verify(run_id).leftovers


def test_a_relog_after_one_killed_mid_upload_commits_and_leaves_only_the_dead_one_to_clean(experiment: str) -> None:
    from tracking import audit, catalog, layout
    from tracking.run import open_run

    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        old = tracking.log_checkpoint(model, epoch=1)
    assert isinstance(old, tracking.LoggedCheckpoint)
    # What a re-log killed halfway through its upload leaves: a PENDING model of the same
    # epoch holding part of the data and no manifest.
    handle = open_run(run_id)
    dead = catalog.create(handle, tracking.load(run_id).manifest)
    dead.store.write_bytes(layout.CHECKPOINT_FILE, b"half a checkpoint")
    assert tracking.load(run_id, checkpoint=1).model_id == old.model_id
    assert tracking.load(run_id).model_id == old.model_id

    with torch.no_grad():
        model.linear.weight.add_(1.0)
    new = tracking.log_checkpoint(model, epoch=1, run_id=run_id)
    assert isinstance(new, tracking.LoggedCheckpoint)
    loaded = tracking.load(run_id, checkpoint=1)
    assert loaded.model_id == new.model_id and torch.equal(loaded.model.linear.weight, model.linear.weight)
    assert {m.model_id: str(m.status) for m in logged_models(run_id)} == {
        dead.model_id: "PENDING",
        new.model_id: "READY",
    }
    report = audit.verify(run_id)
    assert not report.failures
    assert [(dead.model_id in leftover.path, leftover.kind) for leftover in report.leftovers] == [
        (True, audit.NOT_COMMITTED_MODEL)
    ]
    audit.clean_leftovers(run_id)
    assert [m.model_id for m in logged_models(run_id)] == [new.model_id]
    assert dead.store.list_files("") == []
    assert tracking.load(run_id).model_id == new.model_id


def _local_save(tmp_path: Path) -> tuple[Path, Manifest]:
    saved = tmp_path / "epoch=0-step=4.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "epoch": 0, "global_step": 4}, saved)
    manifest = Manifest(
        kind="checkpoint",
        files={},
        model={"class": "tests.lightning_model:TinyLit"},
        epoch=0,
        step=4,
        format="lightning",
    )
    return saved, manifest


def test_a_framework_file_removed_while_its_commit_runs_still_uploads_whole(
    experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved, manifest = _local_save(tmp_path)
    size = saved.stat().st_size
    create = commit.catalog.create

    def create_then_remove(*args: Any) -> Any:
        made = create(*args)
        saved.unlink()  # the framework's retention, racing the upload
        return made

    monkeypatch.setattr(commit.catalog, "create", create_then_remove)
    with mlflow.start_run() as run:
        handle = open_run(run.info.run_id, TrackingConfig.from_env())
        logged = commit.commit_local_files(handle, manifest, {"checkpoint.pt": saved})
    assert not saved.exists()
    [stored] = tracking.list_checkpoints(run.info.run_id)
    assert stored.model_id == logged.model_id and stored.manifest.files["checkpoint.pt"].size == size
    report = audit.verify(run.info.run_id)
    assert report.failures == {} and f"checkpoint-epoch-0000 ({logged.model_id})/checkpoint.pt" in report


def test_a_framework_file_gone_before_its_commit_is_named_and_nothing_is_logged(
    experiment: str, tmp_path: Path
) -> None:
    saved, manifest = _local_save(tmp_path)
    saved.unlink()
    with mlflow.start_run() as run:
        handle = open_run(run.info.run_id, TrackingConfig.from_env())
        with pytest.raises(tracking.TrackingError) as caught:
            commit.commit_local_files(handle, manifest, {"checkpoint.pt": saved})
    message = str(caught.value)
    assert run.info.run_id in message and str(saved) in message and "epoch 0" in message
    assert "No such file" in message and "save again" in message
    assert logged_models(run.info.run_id) == []
