"""The Hugging Face Trainer pipeline against the real stack: train, resume by run ID, the command line on its run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import tracking
from pipelines import noise
from pipelines.hf_model import DigitsClassifier
from tracking import layout
from tracking.localstack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_pipeline(*args: str) -> str:
    """Run ``python -m pipelines.hf_digits ARGS`` to the end; the run ID it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.hf_digits", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for noisy in (noise.SHARDS_BAR, noise.MTIME_WARNING):  # transformers' progress bar and false alarm
        assert noisy not in done.stderr, done.stderr
    found = re.search(r"MLflow run ([0-9a-f]{32})", done.stdout)
    assert found, done.stdout
    return found.group(1)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracking", *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True
    )


@pytest.fixture
def experiment(
    stack_sqlite: LocalStack, use_stack: Callable[[LocalStack], LocalStack], monkeypatch: pytest.MonkeyPatch
) -> LocalStack:
    monkeypatch.setenv("TRACKING_EXPERIMENT", f"hf-{uuid.uuid4().hex[:8]}")
    return use_stack(stack_sqlite)


def train_and_resume() -> str:
    """A run trained 2 epochs, then resumed by its ID to 4 in a second invocation; its ID."""
    run_id = run_pipeline("--epochs", "2", "--keep-last", "2")
    assert run_pipeline("--resume", run_id, "--epochs", "4") == run_id
    return run_id


@pytest.mark.smoke  # make test: the Hugging Face Trainer's one real-stack path
def test_hf_pipeline_resumes_by_run_id_into_the_same_run(experiment: LocalStack) -> None:
    run_id = train_and_resume()

    # The same run went on, held to --keep-last 2 (and the best): the Trainer rotates out the folder
    # materialised from the run (epoch 2) with its logged model, and the pipeline prunes epoch 1, whose
    # folder only the first invocation had.
    run = MlflowClient(experiment.tracking_uri).get_run(run_id)
    assert run.data.tags["tracking.resumed_from_epoch"] == "2"
    found = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in found] == [3, 4]
    assert all(c.manifest.format == "transformers" for c in found)
    assert run.data.tags[layout.TAG_LATEST] == found[-1].model_id
    assert "checkpoint_folder" in run.data.tags["mlflow.note.content"]
    loaded = tracking.load(run_id)
    assert isinstance(loaded.model, DigitsClassifier) and not loaded.model.training


def test_hf_pipeline_resumed_ends_bit_for_bit_where_a_straight_run_ends_and_the_cli_reads_it(
    experiment: LocalStack,
) -> None:
    run_id = train_and_resume()
    # The command line on the real stack (make test proves it in-process, in tests/unit/test_transformers.py).
    listed = cli("checkpoints", run_id, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["epoch"] for c in json.loads(listed.stdout)] == [3, 4]
    shown = cli("show", run_id, "--checkpoint", "best")
    assert shown.returncode == 0 and json.loads(shown.stdout)["format"] == "transformers", shown.stderr
    verified = cli("verify", run_id)
    assert verified.returncode == 0 and "BAD" not in verified.stdout, verified.stdout + verified.stderr
    registered = cli("register", run_id, f"hf-{uuid.uuid4().hex[:8]}", "--checkpoint", "latest")
    assert registered.returncode == 0, registered.stderr
    straight = run_pipeline("--epochs", "4", "--keep-last", "2")

    resumed, expected = tracking.load(run_id), tracking.load(straight)
    assert all(torch.equal(v, expected.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    assert resumed.metrics == expected.metrics
    optimizer = tracking.load(
        run_id, mode="train", scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)
    )
    reference = tracking.load(
        straight, mode="train", scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)
    )
    assert optimizer.optimizer is not None and reference.optimizer is not None
    ours, theirs = optimizer.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    assert all(torch.equal(ours[i][k], v) for i, entry in theirs.items() for k, v in entry.items())
