"""The training and evaluation pipelines end to end, on a sqlite tracking store and file:// artifacts.

The core claim: a run SIGKILLed while writing its epoch-5 checkpoint and resumed to
epoch 8 ends bit-identical to a run that trained 8 epochs straight: weights,
optimizer and scheduler state, RNG states and every metric at every step. Both
ways of resuming are checked: continuing the killed run, and a child run.

MLflow keeps every value logged at a step. A checkpointed epoch logs its metrics
with its checkpoint's commit, so the killed attempt, dying in epoch 5's checkpoint,
never logged epoch 5: the resumed run logs it exactly once. Histories are compared
on the latest value per step.

Runs that must be separate processes (the kill, and a resume in a fresh process)
are subprocesses; the rest call the pipelines' ``main`` in-process to save imports.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines import digits, evaluate, runs, train, training
from pipelines.models import Model
from tests.logs import messages_of
from tests.unit.conftest import use_store

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "pipelines"
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
# Where the fault wrapper kills each pipeline's epoch-5 checkpoint: halfway through the
# checkpoint file, or with that file stored and halfway through its manifest (the commit).
KILL_AT = {
    "train": "checkpoint-epoch-0005/checkpoint.pt",
    "digits": "checkpoint-epoch-0005/manifest.json",
}


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def run_id(self) -> str:
        found = re.search(r"MLflow run ([0-9a-f]{32})", self.out)
        assert found, f"no run ID in stdout:\n{self.out}\nstderr:\n{self.err}"
        return found.group(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One sqlite tracking store for the module, and an experiment storing artifacts under file://."""
    root = tmp_path_factory.mktemp("pipelines")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    # Every compared training runs in a fresh process, on one thread (tests/conftest.py says why).
    variables = {"MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, uri, EXPERIMENT)
        yield {**os.environ, **variables}


def inline(main: Callable[[list[str]], int], *args: str, usage_exits: bool = False) -> Outcome:
    """``main(args)`` in this process, its output captured; ``usage_exits``: a usage error (argparse exits 2)
    is an Outcome with that code and the usage message, not a SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            if not usage_exits:
                raise
            code = int(exc.code or 0)
    return Outcome(code, out.getvalue(), err.getvalue())


def process(env: dict[str, str], *args: str) -> Outcome:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(done.returncode, done.stdout, done.stderr)


@dataclass
class Scenario:
    name: str
    reference: str  # trained 8 epochs straight
    killed: Outcome  # killed during epoch 5's checkpoint, then resumed in place to 8
    killed_epochs: list[int]  # committed checkpoints right after the kill
    killed_status: str
    epoch5: list[tuple[str, list[str]]]  # what the kill left: epoch 5's logged models, (status, files)
    child: str  # resumed from the killed run's epoch 4 into a new run, to 8
    resumed: Outcome


# digits is the second case (Adam, a StepLR schedule, killed in the manifest rather than the data) and
# takes three times as long: make test runs train's, make test-all both.
@pytest.fixture(scope="module", params=[pytest.param("digits", marks=pytest.mark.slow), "train"])
def scenario(request: pytest.FixtureRequest, env: dict[str, str]) -> Scenario:
    name = request.param
    # Every training compared here runs in a fresh process, on env's one thread: one trained in this worker
    # would run on its threads, and with whatever state the tests before it left in the process.
    reference = process(env, f"pipelines.{name}", "--epochs", "8")
    assert reference.code == 0, reference.err

    killed = process(env, "tests.unit.fault", KILL_AT[name], f"pipelines.{name}", "--epochs", "8")
    assert killed.code == -9, killed.err
    client = MlflowClient()
    run = client.get_run(killed.run_id)
    epoch5 = [
        (str(model.status), sorted(f.path for f in client.list_logged_model_artifacts(model.model_id)))
        for model in checkpoint_models(killed.run_id, 5)
    ]
    killed_epochs = [m.epoch or 0 for m in tracking.list_checkpoints(killed.run_id)]

    # The child first: the in-place resume below lets retention delete epoch 4.
    child = process(env, f"pipelines.{name}", "--resume", killed.run_id, "--new-run", "--epochs", "8")
    assert child.code == 0, child.err
    resumed = process(env, f"pipelines.{name}", "--resume", killed.run_id, "--epochs", "8")
    assert resumed.code == 0, resumed.err
    return Scenario(name, reference.run_id, killed, killed_epochs, run.info.status, epoch5, child.run_id, resumed)


def checkpoint_models(run_id: str, epoch: int) -> list[Any]:
    """The run's logged models named for epoch ``epoch``'s checkpoint (any status), oldest first."""
    client = MlflowClient()
    return list(
        client.search_logged_models(
            experiment_ids=[client.get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = 'checkpoint-epoch-{epoch:04d}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": True}],
        )
    )


def checkpoint(run_id: str, epoch: int) -> dict[str, Any]:
    """The raw checkpoint dict, read the seed notes' way from the epoch's READY logged model."""
    (model,) = [m for m in checkpoint_models(run_id, epoch) if str(m.status) == "READY"]
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}", dst_path=tmp)
        return torch.load(Path(tmp) / "checkpoint.pt", weights_only=True)  # type: ignore[no-any-return]


def assert_identical(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    if isinstance(expected, torch.Tensor):
        same = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        same = isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected if same else ():
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        same = isinstance(actual, list | tuple) and len(actual) == len(expected)
        for i in range(len(expected)) if same else ():
            assert_identical(actual[i], expected[i], f"{where}[{i}]")
    else:
        same = actual == expected
    if not same:
        pytest.fail(f"{where} differs", pytrace=False)


def history(run_id: str) -> dict[str, dict[int, float]]:
    """Each metric's latest value per step."""
    out: dict[str, dict[int, float]] = {}
    for key in METRICS:
        logged = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.timestamp)
        out[key] = {m.step: m.value for m in logged}
    return out


def values_at(run_id: str, key: str, step: int) -> list[float]:
    return [m.value for m in MlflowClient().get_metric_history(run_id, key) if m.step == step]


def only(steps: range, metrics: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {key: {s: v for s, v in values.items() if s in steps} for key, values in metrics.items()}


def test_kill_during_checkpoint_leaves_epoch_4_as_the_latest(scenario: Scenario) -> None:
    assert scenario.killed_status == "RUNNING"  # nobody ended the run: the process died
    assert max(scenario.killed_epochs) == 4 and 5 not in scenario.killed_epochs
    # Epoch 5's logged model never became READY, and holds no manifest.
    ((status, files),) = scenario.epoch5
    assert status == "PENDING" and "manifest.json" not in files
    if KILL_AT[scenario.name].endswith("manifest.json"):
        # The checkpoint file was fully stored, but without its manifest it does not exist.
        assert files == ["checkpoint.pt"]


def test_resume_in_place_matches_the_uninterrupted_run(scenario: Scenario) -> None:
    client = MlflowClient()
    resumed, reference = client.get_run(scenario.killed.run_id), client.get_run(scenario.reference)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params == reference.data.params
    assert resumed.data.tags[runs.TAG_RESUMED_FROM_EPOCH] == "4"
    assert resumed.data.tags[runs.TAG_RESUMES] == "1"
    assert "logged again" not in scenario.resumed.err  # epoch 5's metrics died with its checkpoint

    assert_identical(checkpoint(scenario.killed.run_id, 8), checkpoint(scenario.reference, 8))
    assert_identical(tracking.load_state_dict(scenario.killed.run_id), tracking.load_state_dict(scenario.reference))
    assert history(scenario.killed.run_id) == history(scenario.reference)
    assert set(history(scenario.killed.run_id)["val_loss"]) == set(range(1, 9))
    for key in METRICS:
        assert values_at(scenario.killed.run_id, key, 5) == values_at(scenario.reference, key, 5), key
        assert len(values_at(scenario.killed.run_id, key, 5)) == 1, key


def test_resume_into_a_new_run_matches_the_uninterrupted_run(scenario: Scenario) -> None:
    client = MlflowClient()
    child, reference = client.get_run(scenario.child), client.get_run(scenario.reference)
    parent = scenario.killed.run_id
    assert child.info.experiment_id == reference.info.experiment_id
    assert child.info.status == "FINISHED"
    assert child.data.params == reference.data.params
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags[runs.TAG_RESUMED_FROM_RUN] == parent
    assert child.data.tags[runs.TAG_RESUMED_FROM_EPOCH] == "4"

    assert_identical(checkpoint(scenario.child, 8), checkpoint(scenario.reference, 8))
    expected = history(scenario.reference)
    assert history(scenario.child) == only(range(5, 9), expected)
    assert only(range(1, 5), history(parent)) == only(range(1, 5), expected)


@pytest.mark.parametrize("which", ["latest", "7"])
def test_evaluate_reports_the_validation_metrics_training_logged(scenario: Scenario, which: str) -> None:
    run_id = scenario.reference
    outcome = inline(evaluate.main, "--run-id", run_id, "--checkpoint", which)

    assert outcome.code == 0, outcome.err
    epoch = 8 if which == "latest" else int(which)
    assert f"(epoch {epoch})" in outcome.out and "eval_loss=" in outcome.out
    logged = history(run_id)
    client = MlflowClient()
    assert values_at(run_id, "eval_loss", epoch) == [logged["val_loss"][epoch]]
    assert values_at(run_id, "eval_accuracy", epoch) == [logged["val_accuracy"][epoch]]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_refuses_what_it_cannot_do_exactly(env: dict[str, str]) -> None:
    first = inline(train.main, "--epochs", "2")
    assert first.code == 0, first.err
    run_id = first.run_id

    def refused(main: Callable[[list[str]], int], *args: str) -> str:
        outcome = inline(main, "--resume", run_id, *args)
        assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
        return outcome.err

    assert "already reached epoch 2" in refused(train.main, "--epochs", "2")
    assert "lr 0.1 -> 0.5" in refused(train.main, "--epochs", "3", "--lr", "0.5")
    assert "--override" in refused(train.main, "--epochs", "3", "--batch-size", "16")
    assert "--new-run" in refused(train.main, "--epochs", "3", "--from-epoch", "1")
    assert "pipelines.train" in refused(digits.main, "--epochs", "3")
    # Another pipeline's run on the same data: refused before anything is read, naming the pipeline to use.
    client = MlflowClient()
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    client.log_param(other, "pipeline", "pipelines.hf_digits")
    client.log_param(other, "dataset", "digits")
    client.set_terminated(other)
    elsewhere = inline(digits.main, "--resume", other, "--epochs", "3")
    assert elsewhere.code == 1 and f"`python -m pipelines.hf_digits --resume {other}`" in elsewhere.err, elsewhere.err
    reshaped = replace(train.TASK, build_model=lambda n: Model(n + 1))
    assert "shape" in refused(partial(training.main, reshaped), "--epochs", "3")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and max(history(run_id)["val_loss"]) == 2  # untouched

    with pytest.raises(SystemExit) as usage:
        inline(train.main, "--new-run")
    assert usage.value.code == 2


@pytest.mark.parametrize(
    "pipeline",
    [
        "pipelines.digits",
        pytest.param("pipelines.hf_digits", marks=pytest.mark.slow),
        pytest.param("pipelines.lightning_digits", marks=pytest.mark.slow),
    ],
)
def test_resuming_a_run_without_checkpoints_says_to_train_a_new_one(env: dict[str, str], pipeline: str) -> None:
    # A run that stopped before its first save: the library's "log one with tracking.log_checkpoint" was no
    # next step for a pipeline's user. Refused before the run is touched.
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    client.log_param(run_id, "pipeline", pipeline)
    client.log_param(run_id, "dataset", "digits")
    client.set_terminated(run_id, "KILLED")
    main = importlib.import_module(pipeline).main

    outcome = inline(main, "--resume", run_id, "--epochs", "3")

    assert outcome.code == 1
    assert outcome.err.strip() == (
        f"error: run {run_id} has no committed checkpoint to resume from: it stopped before its first save, or "
        "its checkpoints were deleted. Train a new run instead (leave out --resume)."
    )
    after = client.get_run(run_id)
    assert (after.info.status, set(after.data.params)) == ("KILLED", {"pipeline", "dataset"})


def test_override_applies_the_new_value_and_records_it(env: dict[str, str]) -> None:
    run_id = inline(train.main, "--epochs", "2").run_id

    outcome = inline(train.main, "--resume", run_id, "--epochs", "3", "--lr", "0.5", "--override")

    assert outcome.code == 0, outcome.err
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[runs.TAG_OVERRIDES] == "from epoch 2: lr 0.1 -> 0.5"
    assert run.data.params["lr"] == "0.1"  # params cannot change; the tag says what did
    assert history(run_id)["lr"] == {1: 0.1, 2: 0.1, 3: 0.5}
    assert checkpoint(run_id, 3)["optim_state"]["param_groups"][0]["lr"] == 0.5


def test_an_override_holds_for_the_runs_later_resumes(env: dict[str, str]) -> None:
    # A run's params cannot change: a later plain --resume took the first values back, and its --keep-last 1
    # deleted the checkpoints the override had asked to keep.
    run_id = inline(train.main, "--epochs", "2", "--keep-last", "1", "--keep-best", "1").run_id
    overridden = inline(
        train.main, "--resume", run_id, "--epochs", "3", "--override", "--lr", "0.5", "--keep-last", "all"
    )
    assert overridden.code == 0, overridden.err

    # Given again, the overridden value is the run's own: no --override needed.
    again = inline(train.main, "--resume", run_id, "--epochs", "4", "--lr", "0.5")

    assert again.code == 0, again.err
    run = MlflowClient().get_run(run_id)
    assert run.data.params["keep_last"] == "1"
    assert {name: value for name, value in run.data.tags.items() if name.startswith(runs.TAG_OVERRIDE_PREFIX)} == {
        "tracking.override.lr": "0.5",
        "tracking.override.keep_last": "all",
    }
    assert run.data.tags[runs.TAG_OVERRIDES] == "from epoch 2: lr 0.1 -> 0.5, keep_last 1 -> all"
    assert [found.epoch for found in tracking.list_checkpoints(run_id)] == [2, 3, 4]
    assert history(run_id)["lr"] == {1: 0.1, 2: 0.1, 3: 0.5, 4: 0.5}
    # And changed again, the tags follow: the history grows, each param holds its latest value.
    inline(train.main, "--resume", run_id, "--epochs", "5", "--override", "--lr", "0.25")
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["tracking.override.lr"] == "0.25"
    assert tags[runs.TAG_OVERRIDES].endswith("; from epoch 4: lr 0.5 -> 0.25")


@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        (["--keep-last", "all"], [1, 2, 3, 4]),
        (["--keep-last", "1"], None),
        # --keep-best all kept no best checkpoint at all beside the last one: only epoch 4 stayed.
        (["--keep-last", "1", "--keep-best", "all"], [1, 2, 3, 4]),
    ],
)
def test_keep_last_all_keeps_every_checkpoint(env: dict[str, str], keep: list[str], kept: list[int] | None) -> None:
    run_id = inline(train.main, "--epochs", "4", "--checkpoint-every", "1", "--keep-best", "1", *keep).run_id

    epochs = [found.epoch for found in tracking.list_checkpoints(run_id)]
    if kept is not None:
        assert epochs == kept
    else:  # the latest and the best by val_loss
        best = min(history(run_id)["val_loss"].items(), key=lambda item: item[1])[0]
        assert epochs == sorted({best, 4})


@pytest.mark.parametrize("module", ["pipelines.train", "pipelines.digits", "pipelines.evaluate"])
def test_help_answers_without_importing_torch_or_mlflow(module: str) -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'sklearn', 'numpy', 'rich'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m" in done.stdout and done.stdout.splitlines()[-1] == "[]"


def test_the_whole_model_is_said_to_be_a_pickle_once_our_way(env: dict[str, str]) -> None:
    with messages_of("mlflow.pytorch") as warnings:
        outcome = inline(train.main, "--epochs", "1")
    assert outcome.code == 0, outcome.err
    assert not [m for m in warnings if "Pickle" in m], warnings
    [line] = [line for line in outcome.out.splitlines() if line.startswith("whole model: models:/")]
    assert "a pickle: load only runs you trust" in line


def test_a_child_from_before_an_override_trains_with_the_value_it_records(env: dict[str, str]) -> None:
    # The child took lr 0.5 from the parent's override tag as its param, but trained on with the 0.1 that
    # epoch 2's optimizer state held: its param and its training disagreed.
    run_id = inline(train.main, "--epochs", "2", "--keep-last", "all").run_id
    assert inline(train.main, "--resume", run_id, "--epochs", "3", "--override", "--lr", "0.5").code == 0

    child = inline(train.main, "--resume", run_id, "--from-epoch", "2", "--new-run", "--epochs", "4")

    assert child.code == 0, child.err
    assert MlflowClient().get_run(child.run_id).data.params["lr"] == "0.5"
    assert history(child.run_id)["lr"] == {3: 0.5, 4: 0.5}
    assert checkpoint(child.run_id, 4)["optim_state"]["param_groups"][0]["lr"] == 0.5


def test_resume_from_a_checkpoints_models_uri_starts_from_that_checkpoint(env: dict[str, str]) -> None:
    # --resume models:/<a checkpoint> went on from the run's latest checkpoint, whichever one the URI named.
    run_id = inline(train.main, "--epochs", "3", "--keep-last", "all").run_id
    (epoch2,) = [found for found in tracking.list_checkpoints(run_id) if found.epoch == 2]
    uri = f"models:/{epoch2.model_id}"

    child = inline(train.main, "--resume", uri, "--new-run", "--epochs", "4")

    assert child.code == 0, child.err
    tags = MlflowClient().get_run(child.run_id).data.tags
    assert tags[runs.TAG_RESUMED_FROM_RUN] == run_id and tags[runs.TAG_RESUMED_FROM_EPOCH] == "2"
    assert set(history(child.run_id)["val_loss"]) == {3, 4}
    # In the run itself that is a rewind, and the URI picks the checkpoint: refused, saying what to do instead.
    rewind = inline(train.main, "--resume", uri, "--epochs", "4")
    assert rewind.code == 1 and "--new-run" in rewind.err, rewind.err
    both = inline(train.main, "--resume", uri, "--from-epoch", "3", "--new-run", "--epochs", "4")
    assert both.code == 1 and f"--resume {run_id}" in both.err and both.err.count("\n") == 1, both.err
    assert max(history(run_id)["val_loss"]) == 3  # untouched


def test_evaluate_of_a_models_uri_refuses_a_checkpoint_pick_in_one_line(env: dict[str, str]) -> None:
    # With a checkpoint's models:/ URI, --checkpoint 2 and best ended in a ValueError's traceback, and
    # --checkpoint state_dict evaluated that checkpoint but printed and named it "state_dict".
    trained = inline(train.main, "--epochs", "2", "--keep-last", "all")
    run_id = trained.run_id
    (epoch1,) = [found for found in tracking.list_checkpoints(run_id) if found.epoch == 1]
    for pick in ("2", "best", "state_dict"):
        outcome = inline(evaluate.main, "--run-id", f"models:/{epoch1.model_id}", "--checkpoint", pick)
        assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
        assert f"--run-id {run_id} --checkpoint {pick}" in outcome.err
    # --checkpoint model unpickled the checkpoint, and said the run, which has a whole model, had none.
    outcome = inline(evaluate.main, "--run-id", f"models:/{epoch1.model_id}", "--checkpoint", "model", "--trust-pickle")
    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert "is a checkpoint, not a whole model" in outcome.err
    assert f"--run-id {run_id} --checkpoint model --trust-pickle" in outcome.err
    assert values_at(run_id, "eval_loss", 0) == values_at(run_id, "eval_loss", 1) == []
    # The whole model's URI alone: the flags that evaluate it, not a library call.
    (whole,) = re.findall(r"whole model: (models:/m-[0-9a-f]+)", trained.out)
    outcome = inline(evaluate.main, "--run-id", whole)
    assert outcome.code == 1 and "add --checkpoint model --trust-pickle" in outcome.err, outcome.err
    # And a registry version of it (as log_model(registered_model_name=...) makes one), which said to call
    # tracking.load_pickled_model().
    version = mlflow.register_model(whole, "whole-model").version
    outcome = inline(evaluate.main, "--run-id", f"models:/whole-model/{version}")
    assert outcome.code == 1 and "add --checkpoint model --trust-pickle" in outcome.err, outcome.err
    assert inline(evaluate.main, "--run-id", f"models:/{epoch1.model_id}").code == 0
    assert len(values_at(run_id, "eval_loss", 1)) == 1


def test_a_recorded_value_edited_into_one_its_option_refuses_is_said_in_one_line(env: dict[str, str]) -> None:
    # An override tag edited by hand in the UI to a value its option refuses ended in argparse's traceback.
    run_id = inline(train.main, "--epochs", "1").run_id
    client = MlflowClient()
    client.set_tag(run_id, "tracking.override.lr", "abc")
    client.set_tag(run_id, "tracking.override.keep_last", "0")

    refused = inline(train.main, "--resume", run_id, "--epochs", "2")

    assert refused.code == 1 and refused.err.count("\n") == 1, refused.err
    assert run_id in refused.err and "Pass --lr" in refused.err and "--override" in refused.err
    # Given with --override, the option replaces the value: the run goes on, and its tags hold the new one.
    fixed = inline(train.main, "--resume", run_id, "--epochs", "2", "--lr", "0.2", "--keep-last", "2", "--override")
    assert fixed.code == 0, fixed.err
    tags = client.get_run(run_id).data.tags
    assert (tags["tracking.override.lr"], tags["tracking.override.keep_last"]) == ("0.2", "2")
    assert history(run_id)["lr"] == {1: 0.1, 2: 0.2}


def test_experiment_with_a_resume_in_place_is_a_usage_error(env: dict[str, str]) -> None:
    # The run went on in its own experiment, and --experiment was ignored without a word.
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as usage:
        train.main(["--resume", "0" * 32, "--experiment", "elsewhere", "--epochs", "3"])
    assert usage.value.code == 2
    assert "leave --experiment out" in err.getvalue()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # An unset $RUN_ID: a new run of 20 epochs started, --from-epoch, --new-run and --override ignored.
        (["--resume", "", "--from-epoch", "1", "--new-run"], "argument --resume: expected a run ID"),
        (["--resume", " "], "argument --resume: expected a run ID"),
        # Blamed TRACKING_EXPERIMENT (""), or made an experiment named " ".
        (["--experiment", ""], "argument --experiment: expected an experiment name"),
        (["--experiment", "  "], "argument --experiment: expected an experiment name"),
        # numpy's seed refused them with a traceback, after the command line was taken.
        (["--seed", "-1"], "argument --seed: expected a whole number from 0 to 4294967295, got '-1'"),
        (["--seed", str(2**32)], "argument --seed: expected a whole number from 0 to 4294967295"),
        # A run started, and its loss raised a traceback at the first batch: the run was left FAILED.
        (["--lr", "inf"], "argument --lr: expected a positive finite number, got inf"),
        (["--lr", "1e400"], "argument --lr: expected a positive finite number, got inf"),
        # "expected a positive integer, got 0" did not say what keeps every checkpoint.
        (["--keep-last", "0"], "argument --keep-last: expected a positive integer, or all to keep every checkpoint"),
        (["--keep-best", "0"], "argument --keep-best: expected a positive integer, or all to keep every checkpoint"),
    ],
)
def test_a_value_no_training_can_use_is_a_usage_error_before_anything_starts(
    env: dict[str, str], args: list[str], said: str
) -> None:
    client = MlflowClient()

    def stored() -> tuple[int, int]:
        experiments = client.search_experiments()
        return len(experiments), len(client.search_runs([e.experiment_id for e in experiments]))

    before = stored()
    outcome = inline(train.main, "--epochs", "1", *args, usage_exits=True)
    assert outcome.code == 2 and said in outcome.err, outcome.err
    assert stored() == before  # no experiment made, no run started


def interrupted(monkeypatch: pytest.MonkeyPatch, after_epoch: int, *args: str) -> Outcome:
    """pipelines.train with ``args``, Ctrl-C pressed once epoch ``after_epoch``'s checkpoint is saved."""
    saved = tracking.Checkpointer.save

    def save(self: tracking.Checkpointer, *args: Any, **kwargs: Any) -> Any:
        done = saved(self, *args, **kwargs)
        if kwargs["epoch"] == after_epoch:
            raise KeyboardInterrupt
        return done

    with monkeypatch.context() as patch:
        patch.setattr(tracking.Checkpointer, "save", save)
        try:
            return inline(train.main, *args)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the pipeline: Python prints its traceback", pytrace=False)


def test_ctrl_c_ends_the_run_killed_and_says_how_to_go_on_in_one_line(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C printed a traceback and left the run FAILED, as if training had crashed.
    stopped = interrupted(monkeypatch, 2, "--epochs", "4")

    assert stopped.code == 130 and stopped.err.count("\n") == 1, stopped.err
    run_id = stopped.run_id
    assert f"`python -m pipelines.train --resume {run_id} --epochs 4`" in stopped.err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    resumed = inline(train.main, "--resume", run_id, "--epochs", "4")
    assert resumed.code == 0, resumed.err
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert max(history(run_id)["val_loss"]) == 4


def test_runs_of_the_same_seed_get_different_names(env: dict[str, str]) -> None:
    # A local store draws a new run's name from Python's RNG in this process, after the pipeline seeded it:
    # every run of seed 0 was called the same in the UI's run list.
    first, second = inline(train.main, "--epochs", "1"), inline(train.main, "--epochs", "1")

    client = MlflowClient()
    names = {client.get_run(outcome.run_id).info.run_name for outcome in (first, second)}
    assert len(names) == 2, names


def test_a_pick_from_before_a_child_branched_names_its_parent(env: dict[str, str]) -> None:
    # The child's committed epochs were listed, and nothing said that epoch 1 is its parent's.
    parent = inline(train.main, "--epochs", "2", "--keep-last", "all").run_id
    child = inline(train.main, "--resume", parent, "--new-run", "--epochs", "3").run_id

    refused = inline(train.main, "--resume", child, "--from-epoch", "1", "--new-run", "--epochs", "3")

    assert refused.code == 1 and refused.err.count("\n") == 1, refused.err
    assert "committed epochs: 3" in refused.err
    assert f"--resume {parent} --from-epoch 1 --new-run" in refused.err


def test_a_pick_the_child_itself_deleted_is_not_sent_to_its_parent(env: dict[str, str]) -> None:
    # Retention removed the child's epoch 3: it is after the child branched (at 2), so the parent never had
    # it, yet the refusal sent the user to `--resume PARENT --from-epoch 3`.
    parent = inline(train.main, "--epochs", "2", "--keep-last", "2").run_id
    child = inline(train.main, "--resume", parent, "--new-run", "--epochs", "5").run_id

    refused = inline(train.main, "--resume", child, "--from-epoch", "3", "--new-run", "--epochs", "6")
    before = inline(train.main, "--resume", child, "--from-epoch", "2", "--new-run", "--epochs", "6")

    assert refused.code == 1 and "committed epochs: 4, 5" in refused.err, refused.err
    assert parent not in refused.err
    assert before.code == 1 and f"--resume {parent} --from-epoch 2 --new-run" in before.err, before.err


def test_evaluate_of_a_state_dict_a_run_never_logged_refuses_instead_of_evaluating_a_checkpoint(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run stopped before its end has checkpoints but no state dict: --checkpoint state_dict evaluated its latest
    # checkpoint and printed it as "state_dict"; --checkpoint model named tracking.log_model as the next step.
    with monkeypatch.context() as patch:  # as a run stopped after its last checkpoint
        patch.setattr(runs, "log_final_weights", lambda model, epoch, step: SimpleNamespace(model_id=None))
        run_id = inline(train.main, "--epochs", "1").run_id

    for pick, said in (["state_dict"], "has no state dict"), (["model", "--trust-pickle"], "has no whole model"):
        outcome = inline(evaluate.main, "--run-id", run_id, "--checkpoint", *pick)
        assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
        assert said in outcome.err and "leave --checkpoint out" in outcome.err
    assert values_at(run_id, "eval_loss", 0) == []


def test_evaluate_of_a_whole_model_whose_class_is_gone_says_so_not_that_there_is_none(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The class was renamed in the code since the run trained: the pickle cannot name it. It was "has no whole
    # model ... leave --checkpoint out", for a run whose whole model is right there.
    run_id = inline(train.main, "--epochs", "1").run_id
    import pipelines.models

    monkeypatch.delattr(pipelines.models, "Model")
    outcome = inline(evaluate.main, "--run-id", run_id, "--checkpoint", "model", "--trust-pickle")
    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert "cannot import" in outcome.err and "'Model'" in outcome.err and "has no whole model" not in outcome.err


def test_an_overridden_seed_draws_the_batches_from_there_on(env: dict[str, str]) -> None:
    # The checkpoint's RNG states were restored over it: the child recorded seed 5 and trained as seed 0 would.
    parent = inline(train.main, "--epochs", "2", "--keep-last", "all").run_id
    same = inline(train.main, "--resume", parent, "--new-run", "--epochs", "3").run_id
    reseeded = inline(train.main, "--resume", parent, "--new-run", "--epochs", "3", "--seed", "5", "--override").run_id
    again = inline(train.main, "--resume", parent, "--new-run", "--epochs", "3", "--seed", "5", "--override").run_id

    assert MlflowClient().get_run(reseeded).data.params["seed"] == "5"
    assert history(reseeded)["train_loss"] != history(same)["train_loss"]
    assert history(reseeded) == history(again)  # still exactly repeatable


def test_an_overridden_monitor_holds_with_its_mode_for_later_resumes(env: dict[str, str]) -> None:
    # --override --monitor val_accuracy inferred mode max, but only monitor was recorded: the next plain resume
    # ranked val_accuracy with the run's old mode, min, and called the least accurate checkpoint the best.
    run_id = inline(train.main, "--epochs", "2").run_id
    overridden = inline(train.main, "--resume", run_id, "--epochs", "3", "--monitor", "val_accuracy", "--override")
    assert overridden.code == 0, overridden.err

    assert inline(train.main, "--resume", run_id, "--epochs", "4").code == 0

    tags = MlflowClient().get_run(run_id).data.tags
    assert (tags["tracking.override.monitor"], tags["tracking.override.monitor_mode"]) == ("val_accuracy", "max")
    assert tags["tracking.checkpoint.mode"] == "max"
    assert tags[runs.TAG_OVERRIDES] == "from epoch 2: monitor val_loss -> val_accuracy, monitor_mode min -> max"


def test_a_monitor_given_as_recorded_keeps_the_runs_mode(env: dict[str, str]) -> None:
    # Given again, --monitor re-inferred its mode: the run's --monitor-mode max became min, without a word.
    run_id = inline(train.main, "--epochs", "1", "--monitor", "val_loss", "--monitor-mode", "max").run_id

    again = inline(train.main, "--resume", run_id, "--epochs", "2", "--monitor", "val_loss")

    assert again.code == 0, again.err
    assert MlflowClient().get_run(run_id).data.tags["tracking.checkpoint.mode"] == "max"


def test_a_plain_resume_goes_on_to_the_target_the_run_was_last_given(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --resume without --epochs trained to the pipeline's default (20), not to the target the run was started with.
    run_id = interrupted(monkeypatch, 2, "--epochs", "3").run_id

    assert inline(train.main, "--resume", run_id).code == 0
    assert max(history(run_id)["val_loss"]) == 3
    # --epochs on a resume moves the target: recorded, so that the next plain resume goes on to it.
    assert interrupted(monkeypatch, 4, "--resume", run_id, "--epochs", "6").code == 130
    assert MlflowClient().get_run(run_id).data.tags["tracking.epochs"] == "6"
    assert inline(train.main, "--resume", run_id).code == 0
    assert max(history(run_id)["val_loss"]) == 6
    done = inline(train.main, "--resume", run_id)
    assert done.code == 1 and done.err.count("\n") == 1, done.err
    assert "already reached epoch 6 and its target (tag tracking.epochs) is 6; pass --epochs" in done.err


def test_a_child_resumed_in_place_keeps_where_it_branched(env: dict[str, str]) -> None:
    # Its in-place resume overwrote tracking.resumed_from_epoch: the child lost where it branched from its parent.
    parent = inline(train.main, "--epochs", "1").run_id
    child = inline(train.main, "--resume", parent, "--new-run", "--epochs", "2").run_id

    assert inline(train.main, "--resume", child, "--epochs", "3").code == 0

    tags = MlflowClient().get_run(child).data.tags
    assert (tags["mlflow.parentRunId"], tags[runs.TAG_RESUMED_FROM_RUN]) == (parent, parent)
    assert tags["tracking.branched_from_epoch"] == "1"
    assert (tags[runs.TAG_RESUMED_FROM_EPOCH], tags[runs.TAG_RESUMES]) == ("2", "1")  # where its latest resume began


def test_evaluate_logs_the_state_dict_and_the_whole_model_at_the_epoch_they_hold(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their eval_* metrics went to step 0, the start of the run's charts. Both are logged when a training ends:
    # a later resume stopped after epoch 3 leaves them at epoch 2, behind the run's latest checkpoint.
    run_id = inline(train.main, "--epochs", "2").run_id
    assert interrupted(monkeypatch, 3, "--resume", run_id, "--epochs", "4").code == 130

    for pick in ["state_dict"], ["model", "--trust-pickle"]:
        outcome = inline(evaluate.main, "--run-id", run_id, "--checkpoint", *pick)
        assert outcome.code == 0, outcome.err
        assert "(epoch 2)" in outcome.out

    assert values_at(run_id, "eval_loss", 0) == values_at(run_id, "eval_loss", 3) == []
    assert len(values_at(run_id, "eval_loss", 2)) == 2


def test_evaluate_of_a_run_without_checkpoints_says_what_it_lacks_and_what_to_do(env: dict[str, str]) -> None:
    # The library's advice, to log one with tracking.log_checkpoint, means nothing to a pipeline's user.
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    client.log_param(run_id, "pipeline", "pipelines.train")
    client.log_param(run_id, "dataset", "breast_cancer")
    client.set_terminated(run_id, "KILLED")

    outcome = inline(evaluate.main, "--run-id", run_id)

    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert f"run {run_id} has no committed checkpoint to evaluate" in outcome.err
    assert "`python -m pipelines.train`" in outcome.err and "log_checkpoint" not in outcome.err


def test_resume_refuses_a_runs_uri_with_a_path_in_one_line(env: dict[str, str]) -> None:
    # --resume runs:/ID/<path> resumed the run's latest checkpoint, whatever the path named.
    run_id = inline(train.main, "--epochs", "1").run_id

    outcome = inline(train.main, "--resume", f"runs:/{run_id}/checkpoints/epoch_0001", "--epochs", "2")

    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert "models:/" in outcome.err and f"--resume {run_id} --from-epoch N" in outcome.err
    assert max(history(run_id)["val_loss"]) == 1  # untouched


@pytest.mark.parametrize("path", ["model", "state_dict", "checkpoints/epoch_0001"])
def test_evaluate_refuses_a_runs_uri_with_a_path_in_one_line(env: dict[str, str], path: str) -> None:
    # runs:/ID/model ended in a traceback (the library's ValueError: 'model' is not a checkpoint).
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    client.log_param(run_id, "pipeline", "pipelines.train")
    client.log_param(run_id, "dataset", "breast_cancer")
    client.set_terminated(run_id)

    outcome = inline(evaluate.main, "--run-id", f"runs:/{run_id}/{path}")

    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert f"pass --run-id {run_id} with --checkpoint latest, best, N, state_dict or model" in outcome.err
    assert client.get_run(run_id).data.metrics == {}  # nothing evaluated, nothing logged


def test_resume_of_a_whole_models_uri_says_to_pass_the_run_or_a_checkpoint(env: dict[str, str]) -> None:
    # The library's advice, "load a whole model with tracking.load_pickled_model()", was no next step for a
    # pipeline's user: registered or not, a whole model holds no optimizer state to go on from.
    trained = inline(train.main, "--epochs", "1")
    run_id = trained.run_id
    (whole,) = re.findall(r"whole model: (models:/m-[0-9a-f]+)", trained.out)
    version = mlflow.register_model(whole, "whole-model-to-resume").version

    for source in (whole, f"models:/whole-model-to-resume/{version}"):
        outcome = inline(train.main, "--resume", source, "--epochs", "2")

        assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
        assert "is a whole model, not a checkpoint" in outcome.err and "load_pickled_model" not in outcome.err
        assert f"Pass --resume {run_id} to go on from the run's latest checkpoint" in outcome.err
    assert max(history(run_id)["val_loss"]) == 1  # untouched


def test_resume_of_a_whole_models_uri_asks_the_server_for_the_model_once(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library's refusal names the model and its run already: the pipeline's own words need no second look.
    trained = inline(train.main, "--epochs", "1")
    (whole,) = re.findall(r"whole model: (models:/m-[0-9a-f]+)", trained.out)
    asked: list[str] = []
    get_logged_model = MlflowClient.get_logged_model

    def counted(client: MlflowClient, model_id: str) -> Any:
        asked.append(model_id)
        return get_logged_model(client, model_id)

    monkeypatch.setattr(MlflowClient, "get_logged_model", counted)
    outcome = inline(train.main, "--resume", whole, "--epochs", "2")

    assert outcome.code == 1 and "is a whole model, not a checkpoint" in outcome.err, outcome.err
    assert asked == [whole.removeprefix("models:/")]


def test_resume_of_a_run_in_a_deleted_experiment_says_to_restore_the_experiment(env: dict[str, str]) -> None:
    # MLflow marks the runs of a deleted experiment deleted too: "restore it (the run) in the MLflow UI" sent
    # users to restore a run, which MLflow refuses while its experiment stays deleted.
    client = MlflowClient()
    run_id = inline(train.main, "--epochs", "1", "--experiment", "deleted-with-its-runs").run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    client.delete_experiment(experiment_id)

    outcome = inline(train.main, "--resume", run_id, "--epochs", "2")

    assert outcome.code == 1 and outcome.err.count("\n") == 1, outcome.err
    assert f"experiment 'deleted-with-its-runs' (ID {experiment_id}), which is deleted" in outcome.err
    assert f"`mlflow experiments restore --experiment-id {experiment_id}`" in outcome.err
    # A run deleted on its own is the run to restore.
    client.restore_experiment(experiment_id)
    client.delete_run(run_id)
    outcome = inline(train.main, "--resume", run_id, "--epochs", "2")
    assert outcome.code == 1 and f"`mlflow runs restore --run-id {run_id}`" in outcome.err, outcome.err


def test_resume_of_a_run_still_marked_running_refuses_a_live_training_and_warns_of_any_other(
    env: dict[str, str],
) -> None:
    # A run still marked RUNNING was resumed in place without a word, a training that still ran too: the two
    # overwrote each other's checkpoints. A kill -9 leaves the run RUNNING as well, and that is the usual resume.
    client = MlflowClient()
    run_id = inline(train.main, "--epochs", "1").run_id
    recorded = json.loads(client.get_run(run_id).data.tags["tracking.trainer"])
    assert (recorded["host"], recorded["pid"]) == (socket.gethostname(), os.getpid())
    # Its training, this very process, still runs.
    client.update_run(run_id, "RUNNING")

    outcome = inline(train.main, "--resume", run_id, "--epochs", "2")

    assert outcome.code == 2 and outcome.err.count("\n") == 1, outcome.err
    assert f"error: run {run_id} is being trained by process {os.getpid()} on this host" in outcome.err
    assert f"Stop it first (kill {os.getpid()}) or wait for it to finish" in outcome.err
    assert client.get_run(run_id).info.status == "RUNNING" and max(history(run_id)["val_loss"]) == 1  # untouched
    # A child only reads a committed checkpoint: neither refused nor warned about.
    child = inline(train.main, "--resume", run_id, "--new-run", "--epochs", "2")
    assert child.code == 0 and "warning" not in child.err, child.err

    # A dead process (one whose ID is free, or one whose ID another process has taken since), another host's
    # process, and none recorded: one warning line, and the resume goes on.
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    trainers = [
        ({**recorded, "pid": ended.pid}, f"process {ended.pid} on {socket.gethostname()}", "which no longer runs"),
        ({**recorded, "started": "another boot:1"}, f"process {os.getpid()}", "which no longer runs"),
        ({**recorded, "host": "elsewhere"}, f"process {os.getpid()} on elsewhere", "which this host cannot check"),
        (None, "records no process that trained it", "(tag tracking.trainer)"),
    ]
    for epochs, (trainer, who, why) in enumerate(trainers, start=2):
        client.update_run(run_id, "RUNNING")
        if trainer is None:
            client.delete_tag(run_id, "tracking.trainer")
        else:
            client.set_tag(run_id, "tracking.trainer", json.dumps(trainer))

        outcome = inline(train.main, "--resume", run_id, "--epochs", str(epochs))

        assert outcome.code == 0, outcome.err
        [warning] = [line for line in outcome.err.splitlines() if line.startswith("warning:")]
        assert f"warning: run {run_id} is still marked RUNNING and" in warning and who in warning and why in warning
        assert "overwrite each other's checkpoints" in warning
        assert max(history(run_id)["val_loss"]) == epochs


@pytest.mark.parametrize(
    "pipeline", ["pipelines.train", "pipelines.digits", "pipelines.hf_digits", "pipelines.lightning_digits"]
)
def test_every_pipeline_refuses_a_run_no_pipeline_or_another_one_trained_alike(
    env: dict[str, str], pipeline: str
) -> None:
    # A run with no pipeline param was resumed by pipelines.hf_digits (and by train and digits), refused by
    # pipelines.lightning_digits; another pipeline's run was refused by each in its own words.
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    main = importlib.import_module(pipeline).main
    other = "pipelines.train" if pipeline != "pipelines.train" else "pipelines.lightning_digits"
    runs_by = {}
    for trained_by in (None, other):
        run_id = client.create_run(experiment_id).info.run_id
        if trained_by is not None:
            client.log_param(run_id, "pipeline", trained_by)
        client.set_terminated(run_id)
        runs_by[trained_by] = run_id

    unknown = inline(main, "--resume", runs_by[None], "--epochs", "3")
    elsewhere = inline(main, "--resume", runs_by[other], "--epochs", "3")

    assert unknown.code == elsewhere.code == 1, unknown.err + elsewhere.err
    assert unknown.err == (
        f"error: run {runs_by[None]} records no pipeline param: no training pipeline trained it, so {pipeline} "
        "cannot tell what its checkpoints hold; train a new run instead (leave out --resume).\n"
    )
    assert elsewhere.err.startswith(f"error: run {runs_by[other]} was trained by {other} on ")
    assert elsewhere.err.endswith(
        f"resume it with `python -m {other} --resume {runs_by[other]}` (with your other flags).\n"
    )
    for run_id in runs_by.values():
        assert client.get_run(run_id).info.status == "FINISHED"  # untouched
