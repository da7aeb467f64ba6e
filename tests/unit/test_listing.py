"""Listing a run or an experiment with one damaged checkpoint: the healthy ones listed, the bad one named."""

from __future__ import annotations

import logging

import mlflow
import pytest
from click.testing import CliRunner

import tracking
from pipelines.models import Model
from tracking.cli import main
from tracking.errors import IntegrityError


@pytest.mark.parametrize("damage", [b"{not json", b'{"format_version": 1}', b"[]"])
def test_one_malformed_manifest_leaves_the_others_listed_and_is_reported(
    experiment: str, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        for epoch, loss in [(1, 0.5), (2, 0.2), (3, 0.4)]:
            tracking.log_checkpoint(Model(6), epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss")
    bad = tracking.find_checkpoint(run_id, 2)  # the run's best, so marking best meets it too
    bad.store.write_bytes("manifest.json", damage)
    with pytest.raises(IntegrityError):
        tracking.load(run_id, 2)  # loading it still fails, as it must

    with caplog.at_level(logging.WARNING, logger="tracking"):
        listed = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in listed] == [1, 3]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bad.model_id in warning and "unreadable" in warning and "\n" not in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tracking"):
        shown = CliRunner().invoke(main, ["checkpoints", run_id], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0] for line in shown.stdout.replace("│", " ").splitlines() if line.split()}
    assert {"1", "3"} <= rows and "2" not in rows
    assert any(bad.model_id in r.getMessage() for r in caplog.records)

    caplog.clear()
    experiment_name = mlflow.get_experiment(run.info.experiment_id).name
    with caplog.at_level(logging.WARNING, logger="tracking"):
        runs = CliRunner().invoke(main, ["runs", "--experiment", experiment_name, "--json"])
    assert runs.exit_code == 0, runs.output
    assert run_id in runs.stdout
    assert any(bad.model_id in r.getMessage() for r in caplog.records)


def test_a_damaged_manifest_is_said_once_for_a_torchrun_job_on_rank_0(
    experiment: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            tracking.log_checkpoint(Model(6), epoch=epoch)
    bad = tracking.find_checkpoint(run.info.run_id, 1)
    bad.store.write_bytes("manifest.json", b"{not json")

    def said(rank: str) -> list[str]:
        monkeypatch.setenv("RANK", rank)  # every rank of the job lists the run alike
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tracking"):
            assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2]
        return [r.getMessage() for r in caplog.records if bad.model_id in r.getMessage()]

    assert len(said("0")) == 1
    assert said("1") == []
