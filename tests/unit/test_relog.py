"""Re-logging an epoch that was committed already: readers, retention and verify --clean take the new one."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.conftest import purge
from tracking import audit, catalog, replacement
from tracking.errors import StorageError
from tracking.layout import TAG_LATEST, TAG_LATEST_EPOCH
from tracking.run import open_run
from tracking.selection import select_checkpoint
from tracking.storage import open_store


def model_with(bias: float) -> Model:
    model = Model(6)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(bias)
    return model


def bias_of(loaded: tracking.LoadedCheckpoint) -> float:
    return float(next(iter(loaded.model.parameters())).detach().flatten()[0])


def all_models(run_id: str) -> list[Any]:
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return list(
        MlflowClient().search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")
    )


def test_relogging_an_earlier_epoch_replaces_it_for_readers_and_verify_clean(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        for epoch, loss in enumerate([0.5, 0.4, 0.1, 0.3, 0.2], start=1):
            tracking.log_checkpoint(model_with(epoch), epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss")
        old = tracking.find_checkpoint(run_id, 3)
        # The replaced checkpoint's deletion fails, so both stay READY: the new one must still win.
        original = catalog.delete

        def stalled(handle: Any, model_id: str, artifact_uri: str) -> None:
            raise StorageError(f"run {handle.run_id}: the tracking server failed while deleting {model_id}; retry.")

        monkeypatch.setattr(catalog, "delete", stalled)
        with pytest.warns(RuntimeWarning, match="could not be deleted"):
            new = tracking.log_checkpoint(model_with(33), epoch=3, metrics={"val_loss": 0.35}, monitor="val_loss")
        monkeypatch.setattr(catalog, "delete", original)
    assert new.model_id != old.model_id
    assert bias_of(tracking.load(run_id, 3)) == 33.0
    assert {c.epoch: c.model_id for c in tracking.list_checkpoints(run_id)}[3] == new.model_id
    # Best was the replaced checkpoint (0.1): it goes to the best of the rest (epoch 5, 0.2), not the new 0.35.
    assert tracking.load(run_id, "best").epoch == 5
    assert tracking.load(run_id).epoch == 5
    removed = audit.clean_leftovers(run_id)
    assert any(old.model_id in line for line in removed)
    assert not any(new.model_id in line for line in removed)
    assert bias_of(tracking.load(run_id, 3)) == 33.0
    assert old.model_id not in {m.model_id for m in all_models(run_id)}


def test_keep_last_two_after_relogging_an_earlier_epoch_keeps_the_newest_two(experiment: str) -> None:
    checkpointer = tracking.Checkpointer(keep_last=2, monitor="val_loss")
    with mlflow.start_run() as run:
        for epoch in (1, 2, 3, 2, 4, 5):
            checkpointer.save(model_with(epoch), epoch=epoch, metrics={"val_loss": 1.0})
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [4, 5]
    # No replaced checkpoint of epoch 2 lingers as a READY logged model either.
    assert sorted(m.name for m in all_models(run.info.run_id)) == ["checkpoint-epoch-0004", "checkpoint-epoch-0005"]


def test_a_reader_with_the_tags_read_before_a_relog_of_the_latest_epoch_gets_the_new_one(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model_with(1), epoch=1)
        tracking.log_checkpoint(model_with(2), epoch=2)
        reader = open_run(run_id)  # its tags still name the epoch-2 model being replaced
        original = catalog.delete

        def manifest_only(handle: Any, model_id: str, artifact_uri: str) -> None:
            # The re-log's deletion of the replaced model stops after its manifest, as it goes on.
            open_store(artifact_uri, handle.config, owner=model_id).delete("manifest.json")

        monkeypatch.setattr(catalog, "delete", manifest_only)
        tracking.log_checkpoint(model_with(22), epoch=2)
        monkeypatch.setattr(catalog, "delete", original)
    located = select_checkpoint(reader, "latest", None)
    assert located.manifest.epoch == 2
    assert located.model_id == MlflowClient().get_run(run_id).data.tags[TAG_LATEST]


def test_a_tampered_latest_epoch_tag_warns_in_one_line_and_recovers(
    experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model_with(1), epoch=1)
        tracking.log_checkpoint(model_with(2), epoch=2)
        mlflow.set_tag(TAG_LATEST_EPOCH, "99999")
        with caplog.at_level(logging.WARNING, logger="tracking"):
            third = tracking.log_checkpoint(model_with(3), epoch=3)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "\n" not in warning and "99999" in warning and "epoch 2" in warning
        assert tracking.load(run_id).epoch == 3
        tags = MlflowClient().get_run(run_id).data.tags
        assert (tags[TAG_LATEST], tags[TAG_LATEST_EPOCH]) == (third.model_id, "3")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tracking"):
            tracking.log_checkpoint(model_with(4), epoch=4)
        assert not caplog.records
    assert tracking.load(run_id).epoch == 4


@pytest.mark.parametrize("other_writer", ["deleted", pytest.param("deleted and purged", marks=pytest.mark.slow)])
def test_two_writers_relogging_the_latest_epoch_both_replace_it_and_the_second_finds_it_gone_silently(
    experiment: str, monkeypatch: pytest.MonkeyPatch, other_writer: str
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model_with(1), epoch=1)
        old = tracking.log_checkpoint(model_with(2), epoch=2)
        handle = open_run(run_id)
        listed = replacement.replaced

        def raced(*args: Any) -> Any:
            # This writer read the tags naming the old epoch 2; the other writer re-logging it committed and
            # deleted the old one before this one deletes it (`mlflow gc` may have purged it since too).
            found = listed(*args)
            assert old.model_id in found[0]
            assert old.artifact_uri is not None
            catalog.delete(handle, old.model_id, old.artifact_uri)
            if other_writer == "deleted and purged":
                purge(old.model_id)
            return found

        monkeypatch.setattr(replacement, "replaced", raced)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # was: "... which could not be deleted (...)", with nothing to remove
            new = tracking.log_checkpoint(model_with(22), epoch=2)
        monkeypatch.setattr(replacement, "replaced", listed)
    assert bias_of(tracking.load(run_id, 2)) == 22.0 and tracking.load(run_id).model_id == new.model_id
    assert [(c.epoch, c.model_id) for c in tracking.list_checkpoints(run_id)][1] == (2, new.model_id)
    assert old.model_id not in {m.model_id for m in all_models(run_id) if m.status == "READY"}
    assert audit.clean_leftovers(run_id) == []  # nothing was left for `verify --clean`


def test_a_replaced_checkpoint_that_the_server_fails_to_look_up_still_warns(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model_with(1), epoch=1)
        old = tracking.log_checkpoint(model_with(2), epoch=2)

        def failing(self: MlflowClient, model_id: str) -> Any:
            raise MlflowException("the database is locked", error_code=INTERNAL_ERROR)

        # A context of its own: monkeypatch.undo() would also undo the fixtures' settings (moto's keys), and
        # moto's own teardown would then put them back for the rest of the session.
        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "get_logged_model", failing)
            with pytest.warns(RuntimeWarning, match=f"replaces {old.model_id}, which could not be deleted"):
                tracking.log_checkpoint(model_with(22), epoch=2)
    assert old.model_id in {m.model_id for m in all_models(run.info.run_id)}  # left for `verify --clean`
