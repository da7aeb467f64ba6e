"""The Hugging Face pipeline under torchrun (2 gloo ranks on CPU) on a sqlite tracking store and file://
artifacts: 2 epochs, then a resume by run ID to 4, make one run whose every checkpoint holds each rank's RNG
state, and the run is printed once per command, by rank 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tracking

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
EXPERIMENT = "hf-pipeline-ddp"
RNG_FILES = {"rng_state_0.pth", "rng_state_1.pth"}


def _pipeline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "pipelines.hf_digits", *args]
    # Bounded: a rank left waiting in a collective fails the test instead of hanging it.
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_two_epochs_then_a_resume_to_four_on_two_ranks_make_one_run_with_every_ranks_rng_state(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}

    first = _pipeline(env, "--epochs", "2", "--keep-last", "all")  # recorded: the resume keeps every epoch too
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    announced = re.findall(r"MLflow run ([0-9a-f]{32})", first.stdout)
    assert len(announced) == 1, first.stdout
    run_id = announced[0]
    assert first.stdout.count("latest checkpoint: epoch 2") == 1, first.stdout

    resumed = _pipeline(env, "--resume", run_id, "--epochs", "4")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    assert re.findall(r"MLflow run ([0-9a-f]{32})", resumed.stdout) == [run_id], resumed.stdout
    assert resumed.stdout.count("latest checkpoint: epoch 4") == 1, resumed.stdout

    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [run_id]
    config = tracking.TrackingConfig(tracking_uri=uri)
    saved = tracking.list_checkpoints(run_id, config=config)
    assert [c.epoch for c in saved] == [1, 2, 3, 4]
    for checkpoint in saved:
        assert set(checkpoint.manifest.files) >= RNG_FILES, (checkpoint.epoch, sorted(checkpoint.manifest.files))
    # 1,437 rows in batches of 64 are 23 batches, 12 steps an epoch on each rank (the second takes one batch again);
    # the resume charted each epoch once, at its last step.
    for key in ("loss", "eval_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [12, 24, 36, 48], key
    # The description's resume command is the one that trains it further: on as many ranks.
    description = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
    assert f"torchrun --nproc-per-node 2 -m pipelines.hf_digits --resume {run_id}" in description, description

    # In one process the Trainer counted 23 steps an epoch: it went on after 2 batches of epoch 3, to step 115.
    alone = subprocess.run(
        [sys.executable, "-m", "pipelines.hf_digits", "--resume", run_id, "--new-run", "--epochs", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    _refused(alone, run_id, "at step 48 was saved by 2 ranks, and this resume runs in one process: the Trainer would")
    # Batches of 70 are 21, 11 steps an epoch on each rank: refused before training. Batches of 60 are 24, 12 steps
    # an epoch on each rank as batches of 64 (in one process they are 24 steps, not 23): the child goes on at
    # epoch 5's first step and ends it at step 60.
    fewer = _pipeline(env, "--resume", run_id, "--new-run", "--override", "--batch-size", "70", "--epochs", "5")
    _refused(fewer, run_id, "ends epoch 4 of 12 steps in batches of 64; in batches of 70 an epoch is 11 steps")
    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [run_id]
    same = _pipeline(env, "--resume", run_id, "--new-run", "--override", "--batch-size", "60", "--epochs", "5")
    assert same.returncode == 0, same.stdout + same.stderr[-4000:]
    child = re.findall(r"MLflow run ([0-9a-f]{32})", same.stdout)[0]
    assert [(c.epoch, c.step) for c in tracking.list_checkpoints(child, config=config)] == [(5, 60)]
    assert [m.step for m in client.get_metric_history(child, "eval_loss")] == [60]


def _refused(done: subprocess.CompletedProcess[str], run_id: str, said: str) -> None:
    """``done`` failed before training, every rank with the one error that names ``run_id`` and says ``said``."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and errors, done.stdout + done.stderr[-4000:]
    assert all(line == errors[0] for line in errors) and run_id in errors[0] and said in errors[0], errors
    assert "MLflow run" not in done.stdout, done.stdout
