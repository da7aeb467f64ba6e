"""kill -9 in the middle of a Hugging Face Trainer checkpoint's upload: the previous checkpoint stays the
run's latest and loads, verify --clean removes what the dead save left, and a resume by run ID ends where
a run that never stopped ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import pipelines.hf_model  # noqa: F401  (the class the checkpoints name: the loader imports no module itself)
import tracking
from tests.reliability import invariants
from tracking import audit, layout
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
# Epoch 3's weights: stored, then the process dies before its other files, its manifest, READY and the tags.
KILL = ["--when", "after", "--op", "PutObject", "--key", r"model\.safetensors$", "--nth", "3"]
TRAIN = ["--epochs", "4", "--keep-last", "all"]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )


def test_kill_during_an_hf_save_leaves_the_previous_checkpoint_and_resume_is_exact(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKING_EXPERIMENT", f"reliability-hf-{uuid.uuid4().hex[:8]}")
    killed = run(["tests.reliability.crash", *KILL, "pipelines.hf_digits", *TRAIN])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    found = re.search(r"MLflow run ([0-9a-f]{32})", killed.stdout)
    assert found, killed.stdout
    run_id = found.group(1)

    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2]
    assert invariants.epoch_of_tag(invariants.run_tags(run_id), layout.TAG_LATEST) == 2
    assert tracking.load(run_id).epoch == 2
    report = audit.verify(run_id)
    assert not report.failures and report.leftovers, report
    audit.clean_leftovers(run_id)
    assert not audit.verify(run_id).leftovers

    resumed = run(["pipelines.hf_digits", "--resume", run_id, "--epochs", "4"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run(["pipelines.hf_digits", *TRAIN])
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_id = re.search(r"MLflow run ([0-9a-f]{32})", straight.stdout)
    assert straight_id, straight.stdout

    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2, 3, 4]
    final, expected = tracking.load(run_id), tracking.load(straight_id.group(1))
    assert final.epoch == 4
    assert all(torch.equal(v, expected.model.state_dict()[k]) for k, v in final.model.state_dict().items())
