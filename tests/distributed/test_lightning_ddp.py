"""Lightning's DDP (2 gloo ranks on CPU, under torchrun) with MLflowCheckpoints, on the real stack:
rank 0 writes each checkpoint once, every rank agrees on the outcome, and a failed upload makes
every rank raise rather than wait at Lightning's barrier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from tests.lightning_model import TinyLit
from tracking import layout
from tracking.localstack import LocalStack

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _launch(stack: LocalStack, run_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "tests.distributed.lightning_ddp", run_id]
    env = {**os.environ, **stack.env()}
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_id(stack_sqlite: LocalStack, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in stack_sqlite.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", stack_sqlite.tracking_uri)
    client = MlflowClient(stack_sqlite.tracking_uri)
    experiment = client.get_experiment_by_name("lightning-ddp")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("lightning-ddp")
    return str(client.create_run(experiment_id).info.run_id)


def test_ddp_rank0_writes_and_every_rank_finishes(stack_sqlite: LocalStack, run_id: str) -> None:
    done = _launch(stack_sqlite, run_id)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "rank 0: done" in done.stdout and "rank 1: done" in done.stdout
    saved = tracking.list_checkpoints(run_id)
    assert 1 <= len(saved) <= 2 and saved[-1].epoch == 2
    models = MlflowClient(stack_sqlite.tracking_uri).search_logged_models(
        experiment_ids=[MlflowClient().get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    assert sorted(m.model_id for m in models) == sorted(str(c.model_id) for c in saved)  # written once each
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST] == saved[-1].model_id and tags[layout.TAG_MONITOR] == "val_loss"


def test_ddp_saves_by_step_are_keyed_by_step(stack_sqlite: LocalStack, run_id: str) -> None:
    done = _launch(stack_sqlite, run_id, "--steps")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "rank 0: done" in done.stdout and "rank 1: done" in done.stdout
    saved = tracking.list_checkpoints(run_id)
    assert [(c.keyed_by, c.step) for c in saved] == [("step", 4), ("step", 6)]
    models = MlflowClient(stack_sqlite.tracking_uri).search_logged_models(
        experiment_ids=[MlflowClient().get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    assert sorted(m.model_id for m in models) == sorted(str(c.model_id) for c in saved)  # written once each
    tags = MlflowClient().get_run(run_id).data.tags
    assert (tags[layout.TAG_LATEST], tags[layout.TAG_LATEST_STEP]) == (saved[-1].model_id, "6")


def test_ddp_failed_upload_raises_on_every_rank(stack_sqlite: LocalStack, run_id: str) -> None:
    done = _launch(stack_sqlite, run_id, "--fail")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    for rank in (0, 1):
        assert f"rank {rank}: raised StorageError: the store refused the upload" in output, output[-4000:]
    assert tracking.list_checkpoints(run_id) == []


def test_ddp_a_fresh_fit_into_the_run_is_refused_on_every_rank_before_validating_and_a_resumed_one_goes_on(
    stack_sqlite: LocalStack, run_id: str
) -> None:
    first = _launch(stack_sqlite, run_id)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    again = _launch(stack_sqlite, run_id, "--sanity")
    assert again.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: raised TrackingError: run {run_id}: this training starts afresh" in again.stdout, (
            again.stdout + again.stderr[-4000:]
        )
        assert f"rank {rank}: validated 0" in again.stdout  # refused before the sanity check's validation
    resumed = _launch(stack_sqlite, run_id, "--sanity", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    assert "rank 0: done" in resumed.stdout and "rank 1: done" in resumed.stdout
    assert tracking.list_checkpoints(run_id)[-1].epoch == 3


def test_ddp_a_resume_with_ranks_seeded_apart_matches_a_straight_fit(stack_sqlite: LocalStack, run_id: str) -> None:
    # Each rank draws its own dropout masks: a resumed rank 1 that restored rank 0's RNG states drew rank 0's.
    # By step (the last two saves kept): the straight fit keeps epoch 3's end (step 6), resumed into the other run.
    straight_run = MlflowClient().create_run(MlflowClient().get_run(run_id).info.experiment_id).info.run_id
    straight = _launch(stack_sqlite, straight_run, "--straight", "--rank-seeds", "--steps")
    assert straight.returncode == 0, straight.stdout + straight.stderr[-4000:]
    resumed = _launch(stack_sqlite, run_id, "--rank-seeds", "--steps", "--resume-from", f"{straight_run}:6")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    assert tracking.list_checkpoints(run_id)[-1].step == tracking.list_checkpoints(straight_run)[-1].step == 8
    # The module's class was the job's __main__'s: rebuilt as its base, which has the same weights.
    expected, found = (tracking.load(run, model=TinyLit()).model.state_dict() for run in (straight_run, run_id))
    assert all(torch.equal(found[name], expected[name]) for name in expected)
