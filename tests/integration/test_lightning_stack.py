"""The Lightning pipeline against the real stack (MLflow server, SeaweedFS as S3): train, resume by run ID
into the same run, and every checkpoint a READY logged model that loads, verifies and lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import tracking
from pipelines import noise
from tracking import layout
from tracking.cli import main
from tracking.localstack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.lightning_digits", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.smoke(stack="sqlite")  # make test: the Lightning integration's one real-stack path
def test_lightning_pipeline_trains_and_resumes_by_run_id_on_the_stack(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKING_EXPERIMENT", f"lightning-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    first = _pipeline("--epochs", "2", "--keep-last", "2", "--keep-best", "1")
    assert first.returncode == 0, first.stderr
    found = re.search(r"MLflow run ([0-9a-f]{32}) \(experiment (\d+)\)", first.stdout)
    assert found, first.stdout
    run_id, experiment_id = found.groups()
    assert "latest checkpoint: epoch 2 (Lightning's epoch=1)" in first.stdout

    second = _pipeline("--resume", run_id, "--epochs", "4")
    assert second.returncode == 0, second.stderr
    assert f"MLflow run {run_id}" in second.stdout  # the same run, not a new one
    for done in (first, second):  # Lightning's adverts and its LeafSpec deprecation are left out
        for noisy in ("LeafSpec", noise.TIP_PREFIX, "litlogger"):
            assert noisy not in done.stderr, done.stderr

    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    saved = tracking.list_checkpoints(run_id)
    # --keep-last 2 (by step) and --keep-best 1 (val_loss): epochs 2 and 3, and the best if it is older.
    epochs = [c.epoch for c in saved]
    assert epochs[-2:] == [2, 3] and len(epochs) <= 3, epochs
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.model_id for m in models) == sorted(str(c.model_id) for c in saved)
    assert all(str(m.status) == "READY" for m in models)
    assert run.data.tags[layout.TAG_LATEST] == saved[-1].model_id
    assert "--resume" in run.data.tags["mlflow.note.content"]

    import pipelines.lightning_modules  # the recorded class's module, imported as a user's code would

    loaded = tracking.load(run_id, "best")
    assert isinstance(loaded.model, pipelines.lightning_modules.LitDigits) and not loaded.model.training
    assert loaded.optimizer is not None and loaded.optimizer.state_dict()["state"]
    runner = CliRunner()
    for args in (["checkpoints", run_id], ["verify", run_id], ["show", run_id, "--checkpoint", "best"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
