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
    saved = tracking.list_checkpoints(run_id, config=tracking.TrackingConfig(tracking_uri=uri))
    assert [c.epoch for c in saved] == [1, 2, 3, 4]
    for checkpoint in saved:
        assert set(checkpoint.manifest.files) >= RNG_FILES, (checkpoint.epoch, sorted(checkpoint.manifest.files))
    # The description's resume command is the one that trains it further: on as many ranks.
    description = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
    assert f"torchrun --nproc-per-node 2 -m pipelines.hf_digits --resume {run_id}" in description, description
