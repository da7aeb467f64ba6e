"""Bad input and failing storage: specific errors, and nothing half-written left visible."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.conftest import BUCKET
from tracking import audit
from tracking.layout import TAG_LATEST
from tracking.storage.s3_client import s3_client


def run_models(run_id: str) -> dict[str, str]:
    """The run's logged models (not deleted): model ID -> status."""
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return {m.model_id: str(m.status) for m in models}


def seed_model() -> tuple[Model, torch.optim.SGD]:
    model = Model(n_input_features=6)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def big_model() -> torch.nn.Module:
    # ~12 MB of weights: more than two 5 MB parts, so the upload goes multipart.
    return torch.nn.Linear(1000, 3000)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "torch.nn.Module"),
        ({"optimizer": "sgd"}, TypeError, "Optimizer"),
        ({"epoch": -1}, ValueError, "non-negative"),
        ({"epoch": 1.5}, ValueError, "non-negative"),
        ({"metrics": {"val_loss": "low"}}, ValueError, "'val_loss' must be a finite number"),
        ({"metrics": {"val_loss": float("nan")}}, ValueError, "finite"),
        ({"metrics": {"acc": 0.9}, "monitor": "val_loss"}, ValueError, "monitor metric 'val_loss'"),
        ({"extra": {"model_state": 1}}, ValueError, "clashes"),
        # What MLflow would refuse only after the whole upload, as a server error no retry fixes.
        ({"metrics": {"loss?": 0.1}}, ValueError, r"metric name 'loss\?' holds characters MLflow refuses"),
        ({"metrics": {"": 0.1}}, ValueError, "metric name '' is empty"),
        ({"metrics": {"l" * 251: 0.1}}, ValueError, "is 251 characters long, more than the 250"),
        ({"metrics": {"a/../b": 0.1}}, ValueError, "is a path that MLflow refuses"),
        ({"epoch": 2**63}, ValueError, r"epoch must be .* at most 9223372036854775807 \(int64\)"),
        ({"step": 2**63}, ValueError, r"step must be .* \(int64\)"),
    ],
)
def test_bad_arguments_raise_and_store_nothing(
    experiment: str, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    model, optimizer = seed_model()
    arguments: dict[str, object] = {"model": model, "optimizer": optimizer, "epoch": 1, **kwargs}
    with mlflow.start_run() as run:
        with pytest.raises(error, match=match):
            tracking.log_checkpoint(**arguments)  # type: ignore[arg-type]
    assert tracking.list_checkpoints(run.info.run_id) == []
    assert run_models(run.info.run_id) == {}  # refused before a logged model was created


def test_no_active_run_and_no_run_id(experiment: str) -> None:
    model, optimizer = seed_model()
    with pytest.raises(ValueError, match="no active MLflow run and no run_id"):
        tracking.log_checkpoint(model, optimizer, epoch=1)


def test_unknown_run_id(experiment: str) -> None:
    model, optimizer = seed_model()
    with pytest.raises(tracking.NotFoundError, match="run 0123456789abcdef0123456789abcdef not found"):
        tracking.log_checkpoint(model, optimizer, epoch=1, run_id="0123456789abcdef0123456789abcdef")


def test_failure_mid_upload_keeps_previous_checkpoint_latest(
    s3_experiment: str, mocked_s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
    model = big_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        first = tracking.log_checkpoint(model, optimizer, epoch=1)
        client = s3_client(tracking.TrackingConfig.from_env())
        real_upload_part = client.upload_part
        calls = []

        def failing_upload_part(**kwargs: object) -> object:
            calls.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 2:
                raise ConnectionResetError("injected: connection reset during part 2")
            return real_upload_part(**kwargs)

        monkeypatch.setattr(client, "upload_part", failing_upload_part)
        with pytest.raises(
            tracking.StorageError, match=r"run \w+, checkpoint-epoch-0002 \(m-\w+\): \S+/checkpoint.pt: .*injected"
        ):
            tracking.log_checkpoint(model, optimizer, epoch=2)
        assert 2 in calls

    run_id = run.info.run_id
    assert MlflowClient().get_run(run_id).data.tags[TAG_LATEST] == first.model_id
    assert [m.epoch for m in tracking.list_checkpoints(run_id)] == [1]
    assert tracking.load(run_id, model=big_model()).epoch == 1
    models = run_models(run_id)
    (failed,) = set(models) - {first.model_id}
    assert models == {first.model_id: "READY", failed: "FAILED"}
    s3 = mocked_s3
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # type: ignore[attr-defined]
    # Whatever the failed save left is a leftover, and cleaning leaves no object of it.
    audit.clean_leftovers(run_id)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]  # type: ignore[attr-defined]
    assert not [k for k in keys if failed in k]
    assert run_models(run_id) == {first.model_id: "READY"}


def test_failure_through_mlflow_store_keeps_previous_checkpoint(
    tracking_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment_id = mlflow.create_experiment("files", artifact_location=(tmp_path / "art").as_uri())
    model, optimizer = seed_model()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        first = tracking.log_checkpoint(model, optimizer, epoch=1)

        def fail(self: object, local: str, artifact_path: str | None = None) -> None:
            raise OSError("injected: disk full")

        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        with monkeypatch.context() as patch:
            patch.setattr(LocalArtifactRepository, "log_artifact", fail)
            with pytest.raises(
                tracking.StorageError, match=r"run \w+, checkpoint-epoch-0002 \(m-\w+\): \S+/checkpoint.pt: .*disk full"
            ):
                tracking.log_checkpoint(model, optimizer, epoch=2)
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1]
    assert MlflowClient().get_run(run.info.run_id).data.tags[TAG_LATEST] == first.model_id
    assert sorted(run_models(run.info.run_id).values()) == ["FAILED", "READY"]


class _FullDisk:
    """A file being written on a full disk."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_local_disk_on_the_mlflow_path_is_said_as_such_not_as_a_network_failure(
    tracking_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's repositories move local files only: a save or a load through them stages the file in the temp
    folder. A full one read as "a network or server failure", sending users to check the tracking server."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from tracking.storage import artifact_repo

    experiment_id = mlflow.create_experiment("files", artifact_location=(tmp_path / "art").as_uri())
    model, optimizer = seed_model()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        first = tracking.log_checkpoint(model, optimizer, epoch=1)
        real_open = open

        def full_disk(file: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            return _FullDisk(handle) if "w" in mode else handle

        with monkeypatch.context() as patch:
            patch.setattr(artifact_repo, "open", full_disk, raising=False)
            with pytest.raises(tracking.ConfigError, match=r"checkpoint.pt: .*No space left on device.*TMPDIR"):
                tracking.log_checkpoint(model, optimizer, epoch=2)

        def full_download(self: object, remote_file_path: str, local_path: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(LocalArtifactRepository, "_download_file", full_download)
            with pytest.raises(
                tracking.ConfigError, match=r"manifest.json: cannot make .*No space left on device.*TMPDIR"
            ):
                tracking.load(run.info.run_id)
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1]
    assert MlflowClient().get_run(run.info.run_id).data.tags[TAG_LATEST] == first.model_id
    assert tracking.load(run.info.run_id).epoch == 1


def test_relogging_an_epoch_that_fails_keeps_the_old_checkpoint_loadable(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = seed_model()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)
        second = tracking.log_checkpoint(model, optimizer, epoch=2)
        saved = model.linear.weight.detach().clone()
        with torch.no_grad():
            model.linear.weight.add_(1.0)

        def explode(obj: object, stream: object) -> None:
            raise RuntimeError("injected: serialization failed")

        with monkeypatch.context() as patch:
            patch.setattr(torch, "save", explode)
            with pytest.raises(RuntimeError, match="injected"):
                tracking.log_checkpoint(model, optimizer, epoch=2)
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1, 2]
    loaded = tracking.load(run.info.run_id)
    assert (loaded.epoch, loaded.model_id) == (2, second.model_id)
    assert torch.equal(loaded.model.linear.weight, saved)
    assert tracking.load(run.info.run_id, 2).model_id == second.model_id


def test_relogging_an_epoch_that_fails_mid_upload_keeps_the_old_checkpoint(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
    model = big_model()
    with mlflow.start_run() as run:
        old = tracking.log_checkpoint(model, epoch=3)
        saved = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.mul_(2.0)
        client = s3_client(tracking.TrackingConfig.from_env())
        real_upload_part = client.upload_part

        def failing_upload_part(**kwargs: object) -> object:
            if kwargs["PartNumber"] == 2:
                raise ConnectionResetError("injected: connection reset during part 2")
            return real_upload_part(**kwargs)

        monkeypatch.setattr(client, "upload_part", failing_upload_part)
        with pytest.raises(tracking.StorageError, match="injected"):
            tracking.log_checkpoint(model, epoch=3)
    loaded = tracking.load(run.info.run_id, model=big_model())
    assert loaded.model_id == old.model_id and torch.equal(loaded.model.weight, saved)
    assert tracking.load(run.info.run_id, 3, model=big_model()).model_id == old.model_id
    assert MlflowClient().get_run(run.info.run_id).data.tags[TAG_LATEST] == old.model_id
    assert sorted(run_models(run.info.run_id).values()) == ["FAILED", "READY"]


def test_missing_bucket(mocked_s3: object, tracking_store: str) -> None:
    experiment_id = mlflow.create_experiment("nobucket", artifact_location="s3://no-such-bucket/exp")
    model, optimizer = seed_model()
    with mlflow.start_run(experiment_id=experiment_id):
        with pytest.raises(tracking.StorageError, match=r"bucket 'no-such-bucket' does not exist.*create it"):
            tracking.log_checkpoint(model, optimizer, epoch=1)


def test_missing_credentials(tracking_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s3_client.cache_clear()
    experiment_id = mlflow.create_experiment("nocreds", artifact_location="s3://bucket/exp")
    model, optimizer = seed_model()
    with mlflow.start_run(experiment_id=experiment_id):
        with pytest.raises(tracking.ConfigError, match="AWS_ACCESS_KEY_ID"):
            tracking.log_checkpoint(model, optimizer, epoch=1)


def test_unreachable_endpoint(tracking_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    s3_client.cache_clear()
    experiment_id = mlflow.create_experiment("unreachable", artifact_location="s3://bucket/exp")
    model, optimizer = seed_model()
    with mlflow.start_run(experiment_id=experiment_id):
        with pytest.raises(tracking.StorageError, match=rf"cannot reach S3 at http://127.0.0.1:{port}"):
            tracking.log_checkpoint(model, optimizer, epoch=1)
    s3_client.cache_clear()
