"""Unit tier: moto as S3 and a sqlite tracking store in tmp_path (tracking.testing's fixtures); no network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
from click.testing import CliRunner
from mlflow.cli import cli as mlflow_cli

BUCKET = "unit-artifacts"


@pytest.fixture
def tracking_s3_bucket() -> str:
    """The bucket of tracking.testing's moto S3 (``tracking_s3``) in this tier."""
    return BUCKET


@pytest.fixture
def mocked_s3(tracking_s3: str) -> object:
    """moto's S3 with the empty bucket BUCKET (tracking.testing's ``tracking_s3``): a boto3 client of it."""
    return boto3.client("s3", region_name="us-east-1")


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
    # The pipeline's mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID: set, then deleted, so that ``patch``
    # records it and deletes it again when it is undone (monkeypatch records an unset variable only then).
    patch.setenv("MLFLOW_EXPERIMENT_ID", "")
    patch.delenv("MLFLOW_EXPERIMENT_ID")
    patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    patch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)


def purge(model_id: str) -> None:
    """Remove a deleted logged model of the current tracking store for good, as ``mlflow gc`` does."""
    result = CliRunner().invoke(
        mlflow_cli, ["gc", "--backend-store-uri", mlflow.get_tracking_uri(), "--logged-model-ids", model_id]
    )
    assert result.exit_code == 0, result.output


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, the library's coordination group released with it (FSDP2 in one process)."""
    import torch.distributed as dist

    from tracking.parallel import distributed

    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        distributed.release()
        dist.destroy_process_group()
