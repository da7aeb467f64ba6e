"""The command line over a real run: listing, showing and verifying checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

import tracking
from pipelines.models import Model
from tracking.cli import main
from tracking.selection import find_checkpoint


@pytest.fixture
def run_id(experiment: str) -> str:
    model = Model(6)
    checkpointer = tracking.Checkpointer(monitor="val_loss")
    with mlflow.start_run() as run:
        tracking.log_state_dict(model)
        for epoch, loss in [(1, 0.5), (2, 0.2), (3, 0.4)]:
            checkpointer.save(model, epoch=epoch, step=epoch * 10, metrics={"val_loss": loss})
    return str(run.info.run_id)


def test_checkpoints_lists_epochs_with_latest_and_best(run_id: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", run_id], terminal_width=200)
    assert result.exit_code == 0, result.output
    # A table in a terminal, plain columns into a pipe: either way, one row per epoch.
    cells = [line.replace("│", " ").split() for line in result.output.splitlines()]
    rows = {row[0]: row for row in cells if row and row[0].isdecimal()}
    assert sorted(rows) == ["1", "2", "3"]
    assert "best" in rows["2"] and "latest" in rows["3"] and "latest" not in rows["1"]
    for checkpoint in tracking.list_checkpoints(run_id):
        assert checkpoint.model_id in rows[str(checkpoint.epoch)]


def test_show_prints_the_manifest(run_id: str) -> None:
    result = CliRunner().invoke(main, ["show", run_id, "--checkpoint", "best"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert (manifest["epoch"], manifest["metrics"]) == (2, {"val_loss": 0.2})


def test_verify_passes_then_reports_a_corrupted_file(run_id: str) -> None:
    ok = CliRunner().invoke(main, ["verify", run_id])
    assert ok.exit_code == 0, ok.output
    assert "4 files intact" in ok.output
    second = find_checkpoint(run_id, 2)
    second.store.write_bytes(second.path("checkpoint.pt"), b"not a checkpoint")
    bad = CliRunner().invoke(main, ["verify", run_id])
    assert bad.exit_code == 1
    assert f"BAD checkpoint-epoch-0002 ({second.model_id})/checkpoint.pt" in bad.output
    assert len(bad.stderr.strip().splitlines()) == 1 and "1 of 4 files failed" in bad.stderr


def test_errors_are_one_line_and_exit_1(experiment: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "ffffffffffffffffffffffffffffffff"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert CliRunner().invoke(main, ["show"]).exit_code == 2
    malformed = CliRunner().invoke(main, ["checkpoints", "s3://bucket/key"])
    assert malformed.exit_code == 2 and "is not a run ID" in malformed.stderr


def test_a_bad_pointer_tag_is_one_warning_line(tracking_store: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tracking.layout import TAG_LATEST

    experiment_id = mlflow.create_experiment("cli-warning", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    MlflowClient().set_tag(run.info.run_id, TAG_LATEST, "not-a-model-id")
    done = subprocess.run(
        [sys.executable, "-m", "tracking", "show", run.info.run_id, "--checkpoint", "latest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    warning_lines = [line for line in done.stderr.splitlines() if "not-a-model-id" in line or "Warning" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith(f"warning: run {run.info.run_id}: tag "), done.stderr
    assert json.loads(done.stdout)["epoch"] == 1
