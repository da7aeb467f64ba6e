"""Retention and `tracking gc` against what else holds a run: failing servers, other writers, the registry."""

from __future__ import annotations

import json
import logging
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.conftest import purge
from tracking import catalog, note, pruning
from tracking.cli import main
from tracking.errors import NotFoundError, StorageError
from tracking.layout import TAG_BEST, TAG_BEST_VALUE, TAG_LATEST
from tracking.run import RunHandle, open_run


def epochs(run_id: str) -> list[int]:
    return [int(c.epoch or 0) for c in tracking.list_checkpoints(run_id)]


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def fail_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """catalog.delete fails its first call as a stalled tracking server would; the model IDs asked for."""
    original = catalog.delete
    asked: list[str] = []

    def delete(handle: Any, model_id: str, artifact_uri: str) -> None:
        asked.append(model_id)
        if len(asked) == 1:
            raise StorageError(f"run {handle.run_id}: the tracking server failed while deleting {model_id}; retry.")
        original(handle, model_id, artifact_uri)

    monkeypatch.setattr(catalog, "delete", delete)
    return asked


def test_a_failed_deletion_warns_keeps_the_save_and_is_retried_next_save(
    experiment: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(keep_last=1, monitor="val_loss")
    with mlflow.start_run() as run:
        first = checkpointer.save(model, epoch=1, metrics={"val_loss": 0.5})
        asked = fail_once(monkeypatch)
        with caplog.at_level(logging.WARNING, logger="tracking"):
            second = checkpointer.save(model, epoch=2, metrics={"val_loss": 0.4})
        # The save committed; the failed deletion is one warning line, not the save's error.
        assert isinstance(second, tracking.LoggedCheckpoint) and isinstance(first, tracking.LoggedCheckpoint)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "\n" not in warning and "could not delete epoch 1" in warning and "retries" in warning
        assert epochs(run.info.run_id) == [1, 2]
        # The next pass deletes both epochs that fell out, with no KeyError from the policy's state.
        checkpointer.save(model, epoch=3, metrics={"val_loss": 0.3})
        checkpointer.save(model, epoch=4, metrics={"val_loss": 0.2})
    assert asked[:2] == [first.model_id, first.model_id]
    assert epochs(run.info.run_id) == [4]
    assert tracking.load(run.info.run_id, "best").epoch == 4


def test_retention_counts_a_checkpoint_another_writer_deleted_and_mlflow_gc_purged_as_deleted(
    experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(keep_last=1, monitor="val_loss")
    with mlflow.start_run() as run:
        first = checkpointer.save(model, epoch=1, metrics={"val_loss": 0.5})
        assert isinstance(first, tracking.LoggedCheckpoint) and first.artifact_uri is not None
        # Another writer's retention (or `tracking gc`) deleted it, and `mlflow gc` removed it for good.
        catalog.delete(open_run(run.info.run_id), first.model_id, first.artifact_uri)
        purge(first.model_id)
        with caplog.at_level(logging.WARNING, logger="tracking"):
            checkpointer.save(model, epoch=2, metrics={"val_loss": 0.4})
            checkpointer.save(model, epoch=3, metrics={"val_loss": 0.3})
    # Was: "retention could not delete epoch 1 (... not found ...)" at every save, retrying what is gone.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert epochs(run.info.run_id) == [3]


def test_retention_never_moves_best_to_worse_than_another_writers_best(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        # Writer A keeps its own last checkpoint only; writer B, started after it, commits the run's best.
        a = tracking.Checkpointer(keep_last=1, monitor="val_loss", run_id=run_id)
        a.save(model, epoch=10, metrics={"val_loss": 9.0})
        b = tracking.Checkpointer(monitor="val_loss", run_id=run_id)
        best = b.save(model, epoch=1, metrics={"val_loss": 0.01})
        for epoch, loss in [(11, 8.0), (12, 8.5)]:
            a.save(model, epoch=epoch, metrics={"val_loss": loss})
    assert isinstance(best, tracking.LoggedCheckpoint)
    tags = run_tags(run_id)
    assert (tags[TAG_BEST], float(tags[TAG_BEST_VALUE])) == (best.model_id, 0.01)
    assert tracking.load(run_id, "best").epoch == 1


def test_retention_and_gc_keep_a_registered_checkpoint_and_say_so(
    experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(keep_last=1, monitor="val_loss")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        registered = checkpointer.save(model, epoch=1, metrics={"val_loss": 0.1})
        tracking.register(run_id, "seed", checkpoint=1, alias="champion")
        with caplog.at_level(logging.WARNING, logger="tracking"):
            checkpointer.save(model, epoch=2, metrics={"val_loss": 0.4})
            checkpointer.save(model, epoch=3, metrics={"val_loss": 0.3})
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "keeps epoch 1" in warning and "seed/1" in warning and "--delete-registered" in warning
    assert epochs(run_id) == [1, 3]
    assert tracking.load("models:/seed@champion").epoch == 1
    # Kept, so still the run's best: the tag did not move to a worse survivor.
    assert isinstance(registered, tracking.LoggedCheckpoint)
    assert run_tags(run_id)[TAG_BEST] == registered.model_id

    kept = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1"])
    assert kept.exit_code == 0, kept.output
    assert "kept epoch 1" in kept.output and "seed/1" in kept.output and "0 checkpoints deleted" in kept.output
    assert epochs(run_id) == [1, 3]

    gone = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1", "--delete-registered"])
    assert gone.exit_code == 0, gone.output
    assert epochs(run_id) == [3]
    assert tracking.load(run_id, "best").epoch == 3
    # The alias now names a deleted checkpoint: the error says so, and what to do.
    with pytest.raises(NotFoundError, match=r"version 1 of 'seed'.*was deleted.*Point the alias"):
        tracking.load("models:/seed@champion")
    # A version URI names no alias to point elsewhere (it said to): another version is the way.
    with pytest.raises(NotFoundError, match=r"was deleted .* Load another version of 'seed', or register") as gone:
        tracking.load("models:/seed/1")
    assert "alias" not in str(gone.value)


def test_gc_refuses_a_running_run_without_force(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        for epoch in (1, 2, 3):
            tracking.log_checkpoint(model, epoch=epoch, metrics={"val_loss": 1.0 / epoch}, monitor="val_loss")
        refused = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1"])
        assert refused.exit_code == 1
        assert "still RUNNING" in refused.stderr and "--force" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert epochs(run_id) == [1, 2, 3]
        dry = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1", "--dry-run"])
        assert dry.exit_code == 0 and "would delete epoch 1" in dry.output
        forced = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "2", "--force"])
        assert forced.exit_code == 0, forced.output
        assert epochs(run_id) == [2, 3]
    # Once the run ended, gc needs no --force.
    ended = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1"])
    assert ended.exit_code == 0, ended.output
    assert epochs(run_id) == [3]
    assert run_tags(run_id)[TAG_LATEST] == tracking.list_checkpoints(run_id)[0].model_id


def test_gc_relists_the_description_the_library_wrote_and_leaves_a_users_alone(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    commands = ["python -m pipelines.evaluate --run-id {run_id}"]
    runs = []
    for _ in range(2):
        with mlflow.start_run() as run, tracking.Checkpointer(monitor="val_loss", commands=commands) as checkpointer:
            for epoch, loss in ((1, 0.5), (2, 0.2), (3, 0.4), (4, 0.3)):
                checkpointer.save(model, epoch=epoch, metrics={"val_loss": loss})
        runs.append(run.info.run_id)
    ours, theirs = runs
    before = run_tags(ours)[note.NOTE_TAG]
    deleted = [c.model_id for c in tracking.list_checkpoints(ours)[:3]]
    assert all(model_id in before for model_id in deleted)
    users = f"Baseline for the ablation; compare with {deleted[0]}."
    MlflowClient().set_tag(theirs, note.NOTE_TAG, users)
    written: list[str] = []
    original = RunHandle.set_tags

    def set_tags(handle: RunHandle, tags: dict[str, str], metrics: Any = ()) -> None:
        written.extend(name for name in tags if name == note.NOTE_TAG)
        original(handle, tags, metrics)

    monkeypatch.setattr(RunHandle, "set_tags", set_tags)

    for run_id in runs:
        result = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1"])
        assert result.exit_code == 0, result.output
        assert epochs(run_id) == [4]
    assert written == [note.NOTE_TAG]  # one request, for the run whose description the library wrote

    tags = run_tags(ours)
    (kept,) = tracking.list_checkpoints(ours)
    assert tags[TAG_BEST] == tags[TAG_LATEST] == kept.model_id
    noted = {4: note.NotedCheckpoint(str(kept.model_id), kept.metrics)}
    # As a Checkpointer that kept only epoch 4 would have written it: its commands included.
    assert (
        tags[note.NOTE_TAG]
        == note.describe_run(ours, kept.manifest, noted, tags, monitor="val_loss", commands=commands)[note.NOTE_TAG]
    )
    assert not any(model_id in tags[note.NOTE_TAG] for model_id in deleted)
    assert "| 4 |" in tags[note.NOTE_TAG] and "latest, best" in tags[note.NOTE_TAG]
    assert run_tags(theirs)[note.NOTE_TAG] == users

    again = CliRunner().invoke(main, ["gc", ours, "--keep-last", "1"])
    assert again.exit_code == 0 and "0 checkpoints deleted" in again.output
    assert written == [note.NOTE_TAG]  # nothing deleted, nothing rewritten


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpointer_reused_across_runs_saves_to_each_active_run(s3_experiment: str, async_save: bool) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(keep_last=1, async_save=async_save)
    with mlflow.start_run() as first:
        for epoch in (1, 2):
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": 1.0 / epoch})
    with mlflow.start_run() as second:  # a sweep's next trial, with the same policy
        checkpointer.save(model, epoch=1, metrics={"val_loss": 0.9})
    checkpointer.close()
    # Each run holds its own checkpoints; the second run's retention left the first run's alone.
    assert epochs(first.info.run_id) == [2]
    assert epochs(second.info.run_id) == [1]
    with pytest.raises(ValueError, match="no active MLflow run"):
        checkpointer.save(model, epoch=3, metrics={"val_loss": 0.1})
    assert epochs(second.info.run_id) == [1]


def test_gc_ranks_another_metric_only_by_a_mode_given_and_never_against_the_runs_own(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run, tracking.Checkpointer(monitor="val_loss") as checkpointer:
        for epoch, (loss, accuracy) in enumerate([(0.2, 0.9), (0.4, 0.5), (0.3, 0.6)], start=1):
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": loss, "val_acc": accuracy})
    run_id = run.info.run_id
    best = run_tags(run_id)[TAG_BEST]
    # The run's mode (min) ranks val_loss: taken for val_acc, it kept the worst accuracy and deleted epoch 1.
    guessed = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1", "--monitor", "val_acc"])
    assert guessed.exit_code == 2, guessed.output
    assert run_id in guessed.stderr and "pass mode= (--mode) 'min' or 'max' to rank by 'val_acc'" in guessed.stderr
    # --mode max for the run's own val_loss would keep its worst checkpoints and move best to one of them.
    flipped = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1", "--mode", "max"])
    assert flipped.exit_code == 2, flipped.output
    assert "ranks 'val_loss' by min" in flipped.stderr and "tracking.checkpoint.mode" in flipped.stderr
    with pytest.raises(ValueError, match="pass mode="):
        pruning.prune(run_id, keep_best=1, monitor="val_acc")
    assert epochs(run_id) == [1, 2, 3] and run_tags(run_id)[TAG_BEST] == best

    given = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1", "--monitor", "val_acc", "--mode", "max"])
    assert given.exit_code == 0, given.output
    assert epochs(run_id) == [1, 3] and run_tags(run_id)[TAG_BEST] == best


def test_gc_keeps_no_checkpoint_whose_deletion_died_after_its_manifest_in_place_of_one_that_loads(
    s3_experiment: str,
) -> None:
    model = Model(6)
    with mlflow.start_run() as run, tracking.Checkpointer(monitor="val_loss") as checkpointer:
        for epoch, loss in [(1, 0.5), (2, 0.1), (3, 0.3), (4, 0.4)]:
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": loss})
    run_id = run.info.run_id
    torn = tracking.list_checkpoints(run_id)[1]
    handle = open_run(run_id)
    # A retention killed after deleting epoch 2's manifest: its model stays READY, with the best val_loss.
    catalog.get(handle.client, str(torn.model_id), handle.config).store.delete("manifest.json")
    assert tracking.load(run_id, "best").epoch == 3

    result = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1", "--keep-last", "1"])
    assert result.exit_code == 0, result.output
    # Was [4]: epoch 2 kept as the best, and epoch 3, the best that loads, deleted.
    assert epochs(run_id) == [3, 4] and tracking.load(run_id, "best").epoch == 3
    assert catalog.get_if_present(handle.client, str(torn.model_id), handle.config) is None  # its deletion finished


def test_a_checkpointer_resumed_with_another_retention_keeps_no_checkpoint_whose_deletion_died(
    s3_experiment: str,
) -> None:
    model = Model(6)
    with mlflow.start_run() as run, tracking.Checkpointer(monitor="val_loss") as checkpointer:
        for epoch, loss in [(1, 0.5), (2, 0.1), (3, 0.3)]:
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": loss})
    run_id = run.info.run_id
    torn = tracking.list_checkpoints(run_id)[1]
    handle = open_run(run_id)
    catalog.get(handle.client, str(torn.model_id), handle.config).store.delete("manifest.json")  # a killed deletion
    # Resumed, keeping the best one: epoch 2 (its manifest gone) was kept as it, and epoch 3 deleted.
    with tracking.Checkpointer(keep_last=1, keep_best=1, monitor="val_loss", run_id=run_id) as checkpointer:
        checkpointer.save(model, epoch=4, metrics={"val_loss": 0.4})
    assert epochs(run_id) == [3, 4] and tracking.load(run_id, "best").epoch == 3
    assert catalog.get_if_present(handle.client, str(torn.model_id), handle.config) is None


def test_a_dry_run_of_gc_lists_what_gc_deletes_when_latest_is_not_the_newest_key(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        logged = [tracking.log_checkpoint(model, epoch=e, metrics={"val_loss": 1.0 / e}) for e in (1, 2, 3)]
    run_id = run.info.run_id
    # Epoch 3's save was killed between READY and moving the tags: the latest tag still names epoch 2.
    MlflowClient().set_tag(run_id, TAG_LATEST, logged[1].model_id)
    args = ["gc", run_id, "--keep-last", "1", "--json"]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    real = CliRunner().invoke(main, args)
    assert real.exit_code == 0, real.output
    listed, deleted = ([row["epoch"] for row in json.loads(r.stdout)["deleted"]] for r in (dry, real))
    assert listed == deleted == [1]  # the dry run listed epoch 2 too, which gc keeps as the run's latest
    assert epochs(run_id) == [2, 3]


def test_a_failed_gc_json_names_the_checkpoints_it_deleted_and_those_it_could_not(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        logged = [tracking.log_checkpoint(model, epoch=e, metrics={"val_loss": 1.0 / e}) for e in (1, 2, 3)]
    fail_once(monkeypatch)  # epoch 1 fails to delete, epoch 2 goes
    result = CliRunner().invoke(main, ["gc", run.info.run_id, "--keep-last", "1", "--json"])
    assert result.exit_code == 1, result.output
    printed = json.loads(result.stdout)  # one JSON document: the report, and the error object in it
    assert (printed["type"], printed["exit_code"]) == ("StorageError", 1)
    assert printed["error"] in result.stderr and "could not delete the checkpoint of epoch 1" in printed["error"]
    # Was: the error object alone, though the text output names what was deleted.
    assert [(row["epoch"], row["model_id"]) for row in printed["deleted"]] == [(2, logged[1].model_id)]
    assert [(row["epoch"], row["model_id"]) for row in printed["failed"]] == [(1, logged[0].model_id)]
    assert epochs(run.info.run_id) == [1, 3]
