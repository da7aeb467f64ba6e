"""A run whose checkpoints are keyed by global step (a training that saves every N steps).

The integrations commit what their frameworks save with ``keyed_by="step"``; here the public
calls (``log_checkpoint(keyed_by="step")``, ``Checkpointer(every_n_steps=)``) drive the same
commit, so that naming, listing, picking, retention, the CLI and the run's description are
proved on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking import catalog, layout, note, output
from tracking.catalog import LoggedCheckpoint
from tracking.cli import main
from tracking.errors import NotFoundError, TrackingError
from tracking.manifest import Manifest
from tracking.run import open_run


def log_by_step(run_id: str, model: Model, *, step: int, epoch: int, val_loss: float) -> LoggedCheckpoint:
    optimizer = torch.optim.Adam(model.parameters())
    metrics = {"val_loss": val_loss}
    return tracking.log_checkpoint(
        model, optimizer, epoch=epoch, step=step, metrics=metrics, keyed_by="step", run_id=run_id
    )


def three_steps(model: Model) -> str:
    """A run with checkpoints at steps 500, 1000 (the best) and 1500; its ID."""
    with mlflow.start_run() as run:
        for step, epoch, loss in ((500, 0, 0.5), (1000, 0, 0.3), (1500, 1, 0.4)):
            log_by_step(run.info.run_id, model, step=step, epoch=epoch, val_loss=loss)
    return run.info.run_id


def test_a_run_saved_by_step_names_lists_and_picks_its_checkpoints_by_step(experiment: str) -> None:
    model = Model(6)
    run_id = three_steps(model)

    listed = tracking.list_checkpoints(run_id)
    assert [c.path for c in listed] == [f"checkpoint-step-{step:08d}" for step in (500, 1000, 1500)]
    assert [(c.keyed_by, c.key, c.epoch, c.step) for c in listed] == [
        ("step", 500, 0, 500),
        ("step", 1000, 0, 1000),
        ("step", 1500, 1, 1500),
    ]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST_STEP] == "1500" and layout.TAG_LATEST_EPOCH not in tags
    assert tags[layout.TAG_LATEST] == listed[2].model_id and tags[layout.TAG_BEST] == listed[1].model_id

    assert tracking.find_checkpoint(run_id).manifest.step == 1500
    assert tracking.find_checkpoint(run_id, "best").manifest.step == 1000
    assert tracking.find_checkpoint(run_id, 500).model_id == listed[0].model_id  # an int is the run's key: a step
    assert tracking.find_checkpoint(run_id, "1000").model_id == listed[1].model_id
    assert tracking.find_checkpoint(run_id, step=1500).model_id == listed[2].model_id
    loaded = tracking.load(run_id, 1000)
    assert (loaded.epoch, loaded.step, loaded.model_id) == (0, 1000, listed[1].model_id)
    saved, restored = model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(saved[name], restored[name]) for name in saved)

    with pytest.raises(NotFoundError) as missing:
        tracking.find_checkpoint(run_id, 1)  # epoch 1 exists, but this run picks by step
    assert f"run {run_id}: no committed checkpoint for step 1; committed steps: 500, 1000, 1500." in str(missing.value)


def test_a_step_is_found_by_search_when_the_run_has_no_pointer_tags(experiment: str) -> None:
    run_id = three_steps(Model(6))
    client = MlflowClient()
    for tag in (layout.TAG_LATEST, layout.TAG_LATEST_STEP, layout.TAG_BEST):
        client.delete_tag(run_id, tag)
    assert tracking.find_checkpoint(run_id, 1000).manifest.step == 1000
    assert tracking.find_checkpoint(run_id).manifest.step == 1500


def test_relogging_a_step_replaces_its_checkpoint(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        first = log_by_step(run.info.run_id, model, step=500, epoch=0, val_loss=0.5)
        again = log_by_step(run.info.run_id, model, step=500, epoch=0, val_loss=0.25)
    (only,) = tracking.list_checkpoints(run.info.run_id)
    assert only.model_id == again.model_id != first.model_id and only.metrics["val_loss"] == 0.25


def test_a_run_keeps_one_kind_of_key_and_a_refused_save_stores_nothing(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        with pytest.raises(TrackingError) as refused:
            log_by_step(run.info.run_id, model, step=500, epoch=1, val_loss=0.5)
    message = str(refused.value)
    assert f"run {run.info.run_id} keys its checkpoints by epoch" in message and "new run" in message
    handle = open_run(run.info.run_id)
    assert [m.name for m in catalog.search(handle, status=None)] == ["checkpoint-epoch-0001"]


def test_gc_keeps_the_newest_steps_and_says_steps(experiment: str) -> None:
    run_id = three_steps(Model(6))
    result = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert "deleted step 500 (" in result.output
    assert [c.key for c in tracking.list_checkpoints(run_id)] == [1000, 1500]


def test_the_description_and_the_cli_name_steps(experiment: str) -> None:
    run_id = three_steps(Model(6))
    listed = tracking.list_checkpoints(run_id)
    noted = {c.key: note.NotedCheckpoint(str(c.model_id), c.metrics) for c in listed if c.key is not None}
    tags = MlflowClient().get_run(run_id).data.tags
    description = note.describe_run(run_id, listed[-1].manifest, noted, tags, monitor="val_loss")[note.NOTE_TAG]
    assert "| step | model ID |" in description and "# exactly step 1500" in description
    assert "| 1500 |" in description and "| 500 |" in description

    runs = CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}", "--json"])
    assert runs.exit_code == 0, runs.output
    (summary,) = json.loads(runs.output)
    assert (summary["keyed_by"], summary["latest_step"], summary["latest_epoch"]) == ("step", 1500, 1)
    assert (summary["best_step"], summary["best_epoch"]) == (1000, 0)
    table = CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}"], terminal_width=200)
    assert "step 1500" in table.output and "step 1000 val_loss=0.3" in table.output

    rows = CliRunner().invoke(main, ["checkpoints", run_id, "--json"])
    assert [(c["epoch"], c["step"]) for c in json.loads(rows.output)] == [(0, 500), (0, 1000), (1, 1500)]


def test_a_checkpointer_saving_every_n_steps_keys_and_retains_by_step(experiment: str) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(every_n_steps=4, keep_last=2, monitor="val_loss")
    with mlflow.start_run() as run:
        saved = [
            step
            for step in range(1, 15)
            if checkpointer.save(model, epoch=step // 6, step=step, metrics={"val_loss": 1 / step}) is not None
        ]
        with pytest.raises(ValueError, match="saves by step: pass step="):
            checkpointer.save(model, epoch=3)
    assert saved == [4, 8, 12]
    assert [(c.path, c.epoch) for c in tracking.list_checkpoints(run.info.run_id)] == [
        ("checkpoint-step-00000008", 1),
        ("checkpoint-step-00000012", 2),
    ]
    assert tracking.find_checkpoint(run.info.run_id, "best").manifest.step == 12


def test_keyed_by_step_needs_a_step() -> None:
    with pytest.raises(ValueError, match="keyed_by must be 'epoch', or 'step' with step= given"):
        tracking.log_checkpoint(Model(6), epoch=1, keyed_by="step")
    with pytest.raises(ValueError, match="keyed_by must be"):
        tracking.log_checkpoint(Model(6), epoch=1, step=3, keyed_by="batch")


def test_a_relog_after_the_latest_step_tag_was_deleted_keeps_latest_and_best(experiment: str) -> None:
    model = Model(6)
    run_id = three_steps(model)
    MlflowClient().delete_tag(run_id, layout.TAG_LATEST_STEP)  # by hand, in the UI
    relogged = log_by_step(run_id, model, step=1000, epoch=0, val_loss=0.9)

    assert tracking.find_checkpoint(run_id).manifest.step == 1500  # latest never moves backwards
    tags = MlflowClient().get_run(run_id).data.tags
    assert layout.TAG_LATEST_STEP not in tags or tags[layout.TAG_LATEST_STEP] == "1500"
    # The re-log replaced step 1000 (best at 0.3), so best is the best of the rest: step 1500 at 0.4.
    assert [(c.key, c.model_id) for c in tracking.list_checkpoints(run_id)][1] == (1000, relogged.model_id)
    assert [m.name for m in catalog.search(open_run(run_id))].count("checkpoint-step-00001000") == 1
    assert tracking.find_checkpoint(run_id, "best").manifest.step == 1500


@pytest.mark.parametrize("deleted", [[layout.TAG_LATEST_STEP], [layout.TAG_LATEST_STEP, layout.TAG_LATEST]])
def test_a_save_keyed_by_epoch_is_refused_in_a_run_by_step_whose_tags_were_deleted(
    experiment: str, deleted: list[str]
) -> None:
    model = Model(6)
    run_id = three_steps(model)
    for tag in deleted:
        MlflowClient().delete_tag(run_id, tag)
    with pytest.raises(TrackingError) as refused:
        tracking.log_checkpoint(model, epoch=500, run_id=run_id)
    assert f"run {run_id} keys its checkpoints by step" in str(refused.value)
    assert [c.path for c in tracking.list_checkpoints(run_id)] == [
        f"checkpoint-step-{step:08d}" for step in (500, 1000, 1500)
    ]


def test_step_takes_a_global_step_number_alone_and_says_which_steps_there_are(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = three_steps(Model(6))
    for wrong in (True, "1000", 1000.0):
        with pytest.raises(TypeError, match="step must be"):
            tracking.find_checkpoint(run_id, step=wrong)  # type: ignore[arg-type]
    for negative in ({"step": -1}, {"checkpoint": -1}):
        with pytest.raises(ValueError, match=">= 0"):
            tracking.find_checkpoint(run_id, **negative)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint= or step=, not both"):
        tracking.find_checkpoint(run_id, "best", step=500)  # "best" was dropped without a word
    with pytest.raises(NotFoundError) as missing:
        tracking.find_checkpoint(run_id, step=7)
    assert f"run {run_id}: no committed checkpoint was logged at step 7; their steps: 500, 1000, 1500" in str(
        missing.value
    )

    read = []
    original = catalog.StoredCheckpoint.read_manifest

    def counted(stored: catalog.StoredCheckpoint) -> Manifest:
        read.append(stored.name)
        return original(stored)

    monkeypatch.setattr(catalog.StoredCheckpoint, "read_manifest", counted)
    assert tracking.find_checkpoint(run_id, step=1000).manifest.step == 1000
    assert read == ["checkpoint-step-00001000"]  # the others' params say their steps: not downloaded


def test_a_forced_save_of_a_checkpointer_by_step_without_a_step_says_to_pass_one(experiment: str) -> None:
    checkpointer = tracking.Checkpointer(every_n_steps=4)
    with mlflow.start_run() as run, pytest.raises(ValueError, match=r"every_n_steps=4\) saves by step: pass step="):
        checkpointer.save(Model(6), epoch=1, force=True)  # the end of training, saved whatever the step
    assert catalog.search(open_run(run.info.run_id), status=None) == []


def test_a_checkpointer_by_step_saves_a_step_once_however_often_it_is_called(experiment: str) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(every_n_steps=4)
    with mlflow.start_run() as run:
        # Gradient accumulation: the loop calls save() for every micro-batch, the global step moves every 3rd.
        saved = [
            micro // 3
            for micro in range(3, 27)
            if checkpointer.save(model, epoch=0, step=micro // 3, metrics={"val_loss": 1 / micro}) is not None
        ]
        forced = checkpointer.save(model, epoch=0, step=8, metrics={"val_loss": 0.01}, force=True)
    assert saved == [4, 8]
    assert forced is not None and forced.metrics == {"val_loss": 0.01}  # force= still saves it again
    models = catalog.search(open_run(run.info.run_id), status=None)
    assert [m.name for m in models] == ["checkpoint-step-00000004", "checkpoint-step-00000008"]


@pytest.mark.parametrize("command", [["register", "RUN", "seed"], ["download", "RUN", "--to", "out"]])
def test_a_refused_checkpoint_option_says_a_step_is_taken_too(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--checkpoint", "step-1500"])
    assert result.exit_code == 2
    assert "'step-1500': expected latest, best or an epoch number (e.g. 7; a step, e.g. 1500" in result.output


def test_gc_keep_best_by_a_metric_the_steps_lack_is_a_usage_error_naming_the_ones_they_have(experiment: str) -> None:
    run_id = three_steps(Model(6))
    result = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1", "--monitor", "val_acc", "--force"])
    assert result.exit_code == 2, result.output  # was a traceback
    assert "--monitor" in result.output and "'val_acc', which steps [500, 1000, 1500] lack" in result.output
    assert "a metric they all have: val_loss" in result.output
    assert len(tracking.list_checkpoints(run_id)) == 3


def test_a_checkpointer_saves_by_epochs_or_by_steps_and_refuses_both() -> None:
    with pytest.raises(ValueError, match="every_n_epochs=2 or every_n_steps=500, not both") as refused:
        tracking.Checkpointer(every_n_epochs=2, every_n_steps=500)  # every_n_epochs was ignored without a word
    assert "force=True" in str(refused.value)


def test_runs_finds_latest_and_best_by_search_when_the_tags_are_stale(experiment: str) -> None:
    run_id = three_steps(Model(6))
    listed = tracking.list_checkpoints(run_id)
    client = MlflowClient()
    client.delete_tag(run_id, layout.TAG_LATEST)  # by hand
    client.set_tag(run_id, layout.TAG_BEST, f"m-{'0' * 32}")  # a checkpoint deleted by hand
    result = CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}", "--json"])
    (summary,) = json.loads(result.output)
    assert (summary["latest_step"], summary["latest_model_id"]) == (1500, listed[2].model_id)
    assert (summary["best_step"], summary["best_model_id"], summary["best_value"]) == (1000, listed[1].model_id, 0.3)
    assert tracking.find_checkpoint(run_id).model_id == listed[2].model_id  # as the loader finds them
    assert tracking.find_checkpoint(run_id, "best").model_id == listed[1].model_id


def test_an_80_column_terminal_keeps_the_step_column_of_a_run_keyed_by_step(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = three_steps(Model(6))
    monkeypatch.setattr(output, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(main, ["checkpoints", run_id])
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    header = next(line for line in lines if "model ID" in line)
    assert "step" in header, result.output  # its key: epochs 0, 0, 1 name no checkpoint
    assert all(f" {step} " in result.output for step in (500, 1000, 1500))


@pytest.mark.parametrize(("every", "epoch", "step"), [({"every_n_steps": 4}, 0, "8"), ({}, "1", None)])
def test_a_checkpointer_refuses_a_step_or_epoch_that_is_no_int_saying_which(
    every: dict[str, int], epoch: object, step: object
) -> None:
    checkpointer = tracking.Checkpointer(**every)
    what = "epoch" if step is None else "step"
    with pytest.raises(ValueError, match=f"{what} must be a non-negative int, got '"):
        checkpointer.save(Model(6), epoch=epoch, step=step)  # type: ignore[arg-type]


def test_relogging_a_registered_step_keeps_the_checkpoint_its_alias_loads(experiment: str) -> None:
    model = Model(6)
    run_id = three_steps(model)
    registered = tracking.find_checkpoint(run_id, 1000).model_id
    tracking.register(run_id, "seed", checkpoint=1000, alias="champion")
    with pytest.warns(RuntimeWarning, match=f"replaces {registered}, which registry version seed/1 points at"):
        relogged = log_by_step(run_id, model, step=1000, epoch=0, val_loss=0.9)  # a resume from step 500

    assert tracking.find_checkpoint(run_id, 1000).model_id == relogged.model_id  # the run's readers take the new one
    assert tracking.load("models:/seed@champion").metrics == {"val_loss": 0.3}  # the alias, exactly what it named
    verified = CliRunner().invoke(main, ["verify", run_id, "--clean"])
    assert verified.exit_code == 0, verified.output
    assert "0 leftovers removed" in verified.output and "LEFTOVER" not in verified.output
    assert f"ok  checkpoint-step-00001000 ({registered})/checkpoint.pt" in verified.output  # verified as any other
    assert tracking.load("models:/seed@champion").metrics == {"val_loss": 0.3}


def test_best_never_moves_to_a_registered_checkpoint_that_a_relog_replaced(experiment: str) -> None:
    model = Model(6)
    run_id = three_steps(model)
    tracking.register(run_id, "seed", checkpoint=1000, alias="champion")
    with pytest.warns(RuntimeWarning, match="registry version seed/1"):
        log_by_step(run_id, model, step=1000, epoch=0, val_loss=0.9)  # the registered 0.3 stays, replaced
    log_by_step(run_id, model, step=1500, epoch=1, val_loss=0.95)  # best (step 1500) replaced by a worse one
    best = tracking.find_checkpoint(run_id, "best")
    assert (best.manifest.step, best.manifest.metrics) == (500, {"val_loss": 0.5})  # the best of what the run lists


def test_json_rows_of_a_run_keyed_by_step_have_the_fields_of_one_keyed_by_epoch(s3_experiment: str) -> None:
    run_id = three_steps(Model(6))

    def rows(*args: str) -> Any:
        result = CliRunner().invoke(main, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    expected = [(500, "step", 0, 500), (1000, "step", 0, 1000), (1500, "step", 1, 1500)]
    fields = ("key", "keyed_by", "epoch", "step")
    assert [tuple(row[name] for name in fields) for row in rows("checkpoints", run_id)] == expected
    assert tuple(rows("show", run_id, "--checkpoint", "best")[name] for name in fields) == expected[1]
    deleted = rows("gc", run_id, "--keep-last", "1", "--keep-best", "1", "--dry-run")["deleted"]
    assert [tuple(row[name] for name in fields) for row in deleted] == [expected[0]]
    (summary,) = rows("runs", "--experiment", "unit-s3")
    assert [summary[f"latest_{name}"] for name in ("key", "epoch", "step")] == [1500, 1, 1500]


@contextmanager
def client_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """The tracking-server requests made inside the block, by MlflowClient method."""
    counts: Counter[str] = Counter()
    with monkeypatch.context() as patch:
        for name in dir(MlflowClient):
            original = getattr(MlflowClient, name)
            if name.startswith("_") or not callable(original):
                continue

            def counting(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(MlflowClient, name, counting)
        yield counts


def by_epoch(model: Model) -> str:
    """A run with checkpoints at epochs 1 and 2; its ID."""
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            tracking.log_checkpoint(model, epoch=epoch, metrics={"val_loss": 1 / epoch})
    return run.info.run_id


@pytest.mark.parametrize(
    ("run_of", "every", "first"),
    [
        (by_epoch, {"every_n_steps": 500}, {"epoch": 2, "step": 1}),  # due at step 500
        (three_steps, {"every_n_epochs": 5}, {"epoch": 2}),  # due at epoch 5
    ],
    ids=["steps-on-a-run-by-epoch", "epochs-on-a-run-by-step"],
)
def test_a_checkpointer_keyed_otherwise_than_its_run_is_refused_at_its_first_save_call_due_or_not(
    experiment: str, monkeypatch: pytest.MonkeyPatch, run_of: Any, every: dict[str, int], first: dict[str, int]
) -> None:
    model = Model(6)
    run_id = run_of(model)
    recorded, asked = ("epoch", "step") if run_of is by_epoch else ("step", "epoch")
    before = [m.name for m in catalog.search(open_run(run_id), status=None)]
    checkpointer = tracking.Checkpointer(**every, keep_last=1, run_id=run_id)
    # Was: nothing at this call (not due), the refusal only at the first due one, that much training later.
    with pytest.raises(TrackingError) as refused:
        checkpointer.save(model, metrics={"val_loss": 0.1}, **first)
    assert f"run {run_id} keys its checkpoints by {recorded}, and this one is keyed by {asked}" in str(refused.value)
    assert "Log it to a new run" in str(refused.value)
    with client_requests(monkeypatch) as requests, pytest.raises(TrackingError, match=f"by {recorded}"):
        checkpointer.save(model, metrics={"val_loss": 0.1}, **first)  # still refused, from what it read
    assert sum(requests.values()) == 0, requests
    assert [m.name for m in catalog.search(open_run(run_id), status=None)] == before  # nothing stored or deleted


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh-run", "run-by-epoch"])
def test_a_checkpointer_by_epoch_checks_its_run_once_at_its_first_call_at_no_extra_cost(
    experiment: str, monkeypatch: pytest.MonkeyPatch, resumed: bool
) -> None:
    model = Model(6)

    def new_run() -> str:
        if resumed:
            return by_epoch(model)
        with mlflow.start_run() as run:
            return run.info.run_id

    def saves(run_id: str, *epochs: int) -> list[int]:
        """The requests of each save() call (for ``epochs``) of a new Checkpointer on run ``run_id``."""
        checkpointer = tracking.Checkpointer(every_n_epochs=2, keep_last=2, run_id=run_id)
        costs = []
        for epoch in epochs:
            with client_requests(monkeypatch) as requests:
                checkpointer.save(model, epoch=epoch, metrics={"val_loss": 1 / epoch})
            costs.append(sum(requests.values()))
        return costs

    (alone,) = saves(new_run(), 4)  # a first call that is due
    run_id = new_run()
    first, due, later = saves(run_id, 5, 6, 7)  # not due, due, not due
    # The first call reads the run (and its checkpoints): what the first due save would read, not more.
    assert first > 0 and first + due == alone, (first, due, alone)
    assert later == 0  # not due, once checked: no request
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == ([2, 6] if resumed else [6])


REFUSED_ON_EVERY_RANK = """
import sys, mlflow, torch.distributed as dist
import tracking
from pipelines.models import Model

rank, store, tracking_uri, run_id = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
mlflow.set_tracking_uri(tracking_uri)
checkpointer = tracking.Checkpointer(every_n_steps=500, run_id=run_id)
try:
    checkpointer.save(Model(6), epoch=3, step=1)  # the first step of the loop: not due
    print("rank", rank, "not refused", flush=True)
except tracking.TrackingError as exc:
    print("rank", rank, "refused:", exc, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes; the single-process refusal above is in make test
def test_under_a_process_group_every_rank_is_refused_at_the_first_call(tracking_store: str, tmp_path: Path) -> None:
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("ranks", (tmp_path / "artifacts").as_uri()))
    run_id = by_epoch(Model(6))
    args = [str(tmp_path / "rendezvous"), tracking_store, run_id]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", REFUSED_ON_EVERY_RANK, str(rank), *args],
            cwd=Path(__file__).parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in ranks]  # a rank left waiting times out
    finally:
        for process in ranks:
            process.kill()
    for rank, (process, (out, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0, err[-2000:]
        assert f"rank {rank} refused: run {run_id} keys its checkpoints by epoch" in out, out + err[-2000:]
