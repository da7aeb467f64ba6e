"""The Trainer's own MLflow logging (``report_to="mlflow"``) beside TrackingCallback: the run it starts is ended
at the end of ``train()``, as transformers does, and nothing ends a run it did not start: not a later ``train()``
of that Trainer, not the Trainer dropped and collected while the user's next run is active."""

from __future__ import annotations

import gc
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from transformers.integrations.integration_utils import MLflowCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

import tracking
from pipelines import data
from tests.unit.test_transformers import make_trainer, split
from tracking.integrations.transformers import TrackingCallback, checkpoint_folder, reporting

__all__ = ["split"]  # the module-scoped fixture, shared with test_transformers.py


@pytest.fixture
def trainer_experiment(s3_experiment: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Trainer's MLflowCallback starts its runs in the unit experiment (it reads the variable, not the fluent
    experiment); the fixture's experiment ID."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", s3_experiment)
    return s3_experiment


def status(run_id: str) -> str:
    return mlflow.get_run(run_id).info.status


def active() -> str | None:
    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def test_a_dropped_trainer_ends_not_the_run_the_user_trains_next(
    trainer_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    trainer = make_trainer(split, tmp_path / "first", [TrackingCallback()], epochs=1, report_to="mlflow")
    trainer.train()
    (own,) = mlflow.search_runs(output_format="list")
    # The run the Trainer's MLflowCallback started is ended at the end of train(), as transformers does.
    assert active() is None and status(own.info.run_id) == RunStatus.to_string(RunStatus.FINISHED)
    assert [c.epoch for c in tracking.list_checkpoints(own.info.run_id)] == [1]
    with mlflow.start_run() as run:  # the next trial of a sweep, the next notebook cell
        # The old Trainer is replaced and collected (now, not whenever Python's collector runs) in this run.
        trainer = make_trainer(split, tmp_path / "second", [TrackingCallback()], epochs=1, report_to="mlflow")
        gc.collect()
        assert active() == run.info.run_id
        trainer.train()  # logs into the user's run, which the Trainer leaves to the user to end
        assert active() == run.info.run_id
    assert status(run.info.run_id) == RunStatus.to_string(RunStatus.FINISHED)
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]
    del trainer
    gc.collect()


def test_a_later_train_of_the_trainer_ends_not_the_run_it_goes_on_in(
    trainer_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1, report_to="mlflow")
    trainer.train()
    run_id = mlflow.search_runs(output_format="list")[0].info.run_id
    assert active() is None
    trainer.args.num_train_epochs = 2
    with mlflow.start_run(run_id=run_id):  # as the callback's error says, to go on in the run
        trainer.train(resume_from_checkpoint=checkpoint_folder(run_id, output_dir=tmp_path / "out"))
        # The run is the user's now: the user's own logging after train() still lands in it.
        assert active() == run_id
        mlflow.log_metric("test_accuracy", 0.5)
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2]
    assert len(mlflow.search_runs(output_format="list")) == 1
    del trainer
    gc.collect()


def test_a_nested_run_of_the_trainer_ends_and_leaves_the_run_passed_in_to_the_user(
    trainer_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLFLOW_NESTED_RUN: the Trainer's MLflowCallback starts its own run inside the user's, ended at train end.
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "true")
    with mlflow.start_run() as run:
        callback = TrackingCallback(run_id=run.info.run_id)
        trainer = make_trainer(split, tmp_path / "out", [callback], epochs=1, report_to="mlflow")
        trainer.train()
        assert active() == run.info.run_id
        (nested,) = (r for r in mlflow.search_runs(output_format="list") if r.info.run_id != run.info.run_id)
        assert status(nested.info.run_id) == RunStatus.to_string(RunStatus.FINISHED)
        del trainer, callback
        gc.collect()
        assert active() == run.info.run_id
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]


def test_a_run_the_user_started_is_ended_by_the_user_alone(
    trainer_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1, report_to="mlflow")
        trainer.train()
        assert active() == run.info.run_id
        del trainer
        gc.collect()
        assert active() == run.info.run_id
    assert len(mlflow.search_runs(output_format="list")) == 1
    assert "eval_loss" in mlflow.get_run(run.info.run_id).data.metrics


def test_an_mlflow_callback_placed_after_the_tracking_callback_is_disarmed_too(
    trainer_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    target = mlflow.MlflowClient().create_run(trainer_experiment).info.run_id
    trainer = make_trainer(split, tmp_path / "out", [TrackingCallback(run_id=target), MLflowCallback()], epochs=1)
    trainer.train()
    own = next(r for r in mlflow.search_runs(output_format="list") if r.info.run_id != target)
    assert active() is None and status(own.info.run_id) == RunStatus.to_string(RunStatus.FINISHED)
    assert [c.epoch for c in tracking.list_checkpoints(target)] == [1]
    with mlflow.start_run() as run:
        del trainer
        gc.collect()
        assert active() == run.info.run_id


def test_only_the_mark_of_a_run_an_mlflow_callback_started_itself_is_cleared() -> None:
    ours, own, logged_into = TrackingCallback(), MLflowCallback(), MLflowCallback()
    own._auto_end_run = True  # it started its run: ended at its on_train_end
    flow = DefaultFlowCallback()
    handler = CallbackHandler([flow, ours, own, logged_into], None, None, None, None)
    reporting.follow(handler, ours)
    assert handler.callbacks == [flow, own, logged_into, ours]
    reporting.disarm(handler, ours)
    assert (own._auto_end_run, logged_into._auto_end_run) == (False, False)
    assert reporting.calling_handler() is None  # a test calling an event, not a Trainer: nothing to follow
