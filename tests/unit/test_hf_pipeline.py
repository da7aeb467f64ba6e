"""The Hugging Face pipeline as a command, on a sqlite tracking store and file:// artifacts: what it prints,
and its charts (the epochs without a checkpoint at the same steps as those with one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tracking
from pipelines import noise

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "hf-pipeline"


# A pipeline process (about 20 s): make test-all runs it; make test has the stack's HF pipeline test,
# which checks the same output.
@pytest.mark.slow
def test_checkpoint_every_2_charts_every_epoch_at_its_global_step_without_the_frameworks_noise(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.hf_digits", "--epochs", "3", "--checkpoint-every", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for line in (noise.SHARDS_BAR, noise.MTIME_WARNING):
        assert line not in done.stderr, done.stderr
    found = re.search(r"MLflow run ([0-9a-f]{32})", done.stdout)
    assert found, done.stdout
    run_id = found.group(1)

    # Epoch 1 has no checkpoint (the pipeline logs its metrics itself), epochs 2 and 3 have one.
    saved = tracking.list_checkpoints(run_id, config=tracking.TrackingConfig(tracking_uri=uri))
    assert [c.epoch for c in saved] == [2, 3]
    steps_per_epoch = saved[0].step // 2
    for key in ("eval_loss", "loss"):
        history = MlflowClient(uri).get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch], key


@pytest.mark.parametrize(
    ("launched", "flag", "said"),
    [(True, "fsdp", "--strategy fsdp"), (False, "ddp", "torchrun --nproc-per-node N -m pipelines.hf_digits")],
    ids=["fsdp-under-torchrun", "ddp-without-torchrun"],
)
def test_a_strategy_the_pipeline_cannot_honour_is_refused_in_one_line_before_any_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    launched: bool,
    flag: str,
    said: str,
) -> None:
    from pipelines import hf_digits

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp_path / "a").as_uri())
    rendezvous = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name in rendezvous:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}.items():
        monkeypatch.setenv(name, value)
    if launched:
        for name, value in rendezvous.items():
            monkeypatch.setenv(name, value)
    assert hf_digits.main(["--epochs", "1", "--strategy", flag]) == 1
    error = capsys.readouterr().err
    # MLflow's own log lines (its database being made) come first; the refusal is one line of its own.
    refusals = [line for line in error.splitlines() if line.startswith("error:")]
    assert len(refusals) == 1 and said in refusals[0], error
    assert not MlflowClient(uri).search_runs([experiment_id])
