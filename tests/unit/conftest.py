"""Unit tier: moto as S3 and a sqlite tracking store in tmp_path; no network."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.cli import cli as mlflow_cli
from moto import mock_aws

from tests.mlflow_stores import release_mlflow_stores
from tracking.storage import s3 as s3_storage

BUCKET = "unit-artifacts"


@pytest.fixture
def mocked_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_storage.s3_client.cache_clear()
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    s3_storage.s3_client.cache_clear()


@pytest.fixture(scope="session")
def empty_tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite tracking store with MLflow's schema and nothing else, made once per session.

    MLflow creates a new store by running its ~100 schema migrations: 2-3 s each time, most of
    the unit tier's time when every test did it. A copy of this file is the same fresh store.
    """
    path = tmp_path_factory.mktemp("empty-tracking-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema and experiment 0
    release_mlflow_stores()  # closes the engine: the file is complete and nothing holds it
    return path


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_tracking_db: Path) -> Iterator[str]:
    """A fresh sqlite tracking store in tmp_path, made the current tracking URI."""
    shutil.copyfile(empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(params=["s3", "mlflow"])
def experiment(request: pytest.FixtureRequest, mocked_s3: object, tracking_store: str, tmp_path: Path) -> str:
    """An experiment whose runs store artifacts on (moto) S3 via our fast path, or on file:// via MLflow."""
    location = f"s3://{BUCKET}/exp" if request.param == "s3" else (tmp_path / "artifacts").as_uri()
    experiment_id = mlflow.create_experiment(f"unit-{request.param}", artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(request.param)


@pytest.fixture
def s3_experiment(mocked_s3: object, tracking_store: str) -> str:
    experiment_id = mlflow.create_experiment("unit-s3", artifact_location=f"s3://{BUCKET}/exp")
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def use_store(patch: pytest.MonkeyPatch, uri: str, experiment: str) -> None:
    """Point a pipeline run in this process (its ``main``) at tracking store ``uri`` and ``experiment``.

    Other tests leave an experiment active in this process, and ``mlflow.start_run(run_id=...)`` refuses a
    run from any other experiment; the pipelines themselves never set one.
    """
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.setenv("TRACKING_EXPERIMENT", experiment)
    patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    patch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)


def purge(model_id: str) -> None:
    """Remove a deleted logged model of the current tracking store for good, as ``mlflow gc`` does."""
    result = CliRunner().invoke(
        mlflow_cli, ["gc", "--backend-store-uri", mlflow.get_tracking_uri(), "--logged-model-ids", model_id]
    )
    assert result.exit_code == 0, result.output
