"""The training pipelines against the real stack: MLflow server, SeaweedFS as S3 (+ PostgreSQL)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
from mlflow import MlflowClient

import tracking
from pipelines import evaluate, train
from tracking.localstack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.smoke(stack="sqlite")  # make test: one real-stack path
def test_train_resume_and_evaluate_on_the_stack(
    stack: LocalStack, s3_keys: Callable[[LocalStack, str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = f"pipelines-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKING_EXPERIMENT", experiment)
    # Other tests may leave an experiment active in this process; start_run(run_id=...) would refuse.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)

    first = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--epochs", "2"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert first.returncode == 0, first.stderr
    found = re.search(r"MLflow run ([0-9a-f]{32}) \(experiment (\d+)\)", first.stdout)
    assert found, first.stdout
    run_id, experiment_id = found.groups()
    # Links open the UI's classic training view.
    assert f"{stack.tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning" in (
        first.stdout
    )
    assert f"{stack.tracking_uri}/#/experiments/{experiment_id}/models?workflowType=machine_learning" in first.stdout

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        assert train.main(["--resume", run_id, "--epochs", "3"]) == 0, err.getvalue()
        assert evaluate.main(["--run-id", run_id]) == 0, err.getvalue()

    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tracking.resumed_from_epoch"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3]
    [val_loss] = [m.value for m in client.get_metric_history(run_id, "val_loss") if m.step == 3]
    assert [m.value for m in client.get_metric_history(run_id, "eval_loss")] == [val_loss]

    # Every checkpoint is a READY logged model of the run with its metrics; the whole model too.
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    checkpoints = {m.name: m for m in models if m.model_type == "pytorch-checkpoint"}
    assert set(checkpoints) == {"checkpoint-epoch-0001", "checkpoint-epoch-0002", "checkpoint-epoch-0003"}
    assert all(str(m.status) == "READY" for m in checkpoints.values())
    latest = checkpoints["checkpoint-epoch-0003"]
    assert run.data.tags["tracking.checkpoint.latest"] == latest.model_id
    assert {m.key: m.value for m in latest.metrics or []}["val_loss"] == val_loss
    whole = [m for m in models if m.name == "model"]
    assert len(whole) == 2  # one per training invocation: the first run's end, then the resumed one's
    newest = max(whole, key=lambda m: m.creation_timestamp)
    reloaded = mlflow.pytorch.load_model(f"models:/{newest.model_id}")
    assert tracking.load_model(run_id).state_dict().keys() == reloaded.state_dict().keys()
    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()) as err:
        assert evaluate.main(["--run-id", f"models:/{latest.model_id}"]) == 0, err.getvalue()
        assert evaluate.main(["--run-id", run_id, "--checkpoint", "state_dict"]) == 0, err.getvalue()
        assert evaluate.main(["--run-id", run_id, "--checkpoint", "model", "--trust-pickle"]) == 0, err.getvalue()
    assert out.getvalue().count(f"eval_loss={val_loss:.6f}") == 3, out.getvalue()

    keys = s3_keys(stack, "")
    assert any(key.endswith(f"models/{latest.model_id}/artifacts/manifest.json") for key in keys)
    # The resumed run logged the state dict again: under the name its manifest lists (a re-log
    # alternates state_dict.pt / state_dict.1.pt), and the previous file is gone.
    stored = [key for key in keys if run_id in key and "/state_dict/state_dict" in key]
    assert [key.rsplit("/", 1)[1] for key in stored] == ["state_dict.1.pt"], stored
