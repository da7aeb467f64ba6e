"""kill -9 in the middle of a Lightning checkpoint's save: the previous checkpoint stays loadable, the
run's pointers name it, and the pipeline resumes the run by its ID from there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tracking
from tests.reliability.crash import FINALIZE_MODEL
from tracking import layout
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_during_a_lightning_save_keeps_the_previous_checkpoint_and_resumes(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    monkeypatch.setenv("TRACKING_EXPERIMENT", f"lightning-crash-{uuid.uuid4().hex[:8]}")
    # The third checkpoint's logged model marked READY: killed just before (its manifest is stored, the
    # model PENDING) or just after (READY, the run's tags not moved yet).
    kill = ["tests.reliability.crash", "--when", when, "--op", "mlflow", "--key", FINALIZE_MODEL, "--nth", "3"]
    crashed = _run([*kill, "pipelines.lightning_digits", "--epochs", "4", "--keep-last", "all"])
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr[-3000:]
    found = re.search(r"MLflow run ([0-9a-f]{32})", crashed.stdout)
    assert found, crashed.stdout
    run_id = found.group(1)

    saved = tracking.list_checkpoints(run_id)
    tags = MlflowClient(stack.tracking_uri).get_run(run_id).data.tags
    # Epoch 1's checkpoint (Lightning's second) is the latest; epoch 2's counts only once the tags moved.
    assert [c.epoch for c in saved][:2] == [0, 1]
    assert tags[layout.TAG_LATEST] == saved[1].model_id
    loaded = tracking.load(run_id, model=_factory())
    assert loaded.epoch == 1

    resumed = _run(["pipelines.lightning_digits", "--resume", run_id, "--epochs", "4"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"MLflow run {run_id}" in resumed.stdout
    after = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in after] == [0, 1, 2, 3]
    tags = MlflowClient(stack.tracking_uri).get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST] == after[-1].model_id


def _factory() -> object:
    from pipelines.lightning_modules import LitDigits

    return lambda: LitDigits()
