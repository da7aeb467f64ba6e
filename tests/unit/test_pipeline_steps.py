"""The own-loop pipelines saving every N optimizer steps (``--checkpoint-every-steps``), on sqlite and file://.

The claim: a run stopped at a save in mid-epoch and resumed ends bit-identical to a run that trained straight
(weights, optimizer and scheduler state, RNG states, every metric at every step), both ways: killed while writing
a later save and resumed in place, and branched with ``--from-step N --new-run``. Every compared training is a
fresh process, as in tests/unit/test_pipelines.py.

breast_cancer's 455 training rows in batches of 32 are 15 steps an epoch: a save every 4 steps lands in mid-epoch
(4, 8, 12 in epoch 1; 16 .. 28 in epoch 2), the epochs end at steps 15, 30 and 45. digits' 1,437 rows in batches
of 64 are 23 steps an epoch: saves every 10 steps at 10, 20 (epoch 1), 30, 40 (epoch 2), ..., the last at 69.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import TensorDataset

import tracking
from pipelines import data, evaluate, runs, train
from pipelines.steps import Position
from tests.unit.conftest import use_store
from tests.unit.test_pipelines import Outcome, assert_identical, inline, process, values_at

EXPERIMENT = "pipeline-steps"
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@dataclass(frozen=True)
class Case:
    name: str
    every: int  # --checkpoint-every-steps
    steps: list[int]  # the straight run's saves
    killed_at: int  # the save the kill interrupts (in epoch 2), leaving the one before as the latest
    branched_at: int  # --from-step of the child run (in epoch 1)
    epochs_done: dict[int, int]  # a save's step -> the epochs completed it records


CASES = {
    "train": Case("train", 4, [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 45], 24, 12, {12: 0, 20: 1, 45: 3}),
    "digits": Case("digits", 10, [10, 20, 30, 40, 50, 60, 69], 40, 10, {10: 0, 30: 1, 69: 3}),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("pipeline-steps")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, uri, EXPERIMENT)
        yield {**os.environ, "MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}


class Scenario:
    """A case's runs, each trained (in fresh processes) when a test first asks for it."""

    def __init__(self, case: Case, env: dict[str, str], reference: str) -> None:
        self.case, self.env = case, env
        self.reference = reference  # 3 epochs straight

    @functools.cached_property
    def killed(self) -> tuple[str, list[int]]:
        """Killed while writing the save at case.killed_at (its committed saves then), then resumed in place to 3."""
        case = self.case
        killed = process(
            self.env, "tests.unit.fault", f"checkpoint-step-{case.killed_at:08d}/checkpoint.pt", *args(case)
        )
        assert killed.code == -9, killed.err
        steps = [c.step or 0 for c in tracking.list_checkpoints(killed.run_id)]
        resumed = process(self.env, f"pipelines.{case.name}", "--resume", killed.run_id)
        assert resumed.code == 0, resumed.err
        return killed.run_id, steps

    @functools.cached_property
    def child(self) -> str:
        """--resume reference --from-step case.branched_at --new-run, to 3."""
        branched = ("--resume", self.reference, "--from-step", str(self.case.branched_at), "--new-run")
        child = process(self.env, f"pipelines.{self.case.name}", *branched)
        assert child.code == 0, child.err
        return child.run_id


def args(case: Case) -> tuple[str, ...]:
    every = ("--checkpoint-every-steps", str(case.every))
    return (f"pipelines.{case.name}", "--epochs", "3", *every, "--keep-last", "all")


@pytest.fixture(scope="module")
def straight(env: dict[str, str]) -> Callable[[str], str]:
    """The run ID of a case's 3 epochs straight, trained once a module: the scenarios' reference, the refusals' run."""

    @functools.cache
    def trained(name: str) -> str:
        done = process(env, *args(CASES[name]))
        assert done.code == 0, done.err
        return done.run_id

    return trained


# digits (dropout, batch norm, Adam, a StepLR schedule) takes longer: make test runs train's, make test-all both.
@pytest.fixture(scope="module", params=[pytest.param("digits", marks=pytest.mark.slow), "train"])
def scenario(request: pytest.FixtureRequest, env: dict[str, str], straight: Callable[[str], str]) -> Scenario:
    return Scenario(CASES[request.param], env, straight(request.param))


def stored(run_id: str, step: int | None = None) -> dict[str, Any]:
    """The raw checkpoint dict of the run's save at ``step`` (its latest: None), read the seed notes' way."""
    found = tracking.find_checkpoint(run_id, "latest" if step is None else step)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{found.model_id}", dst_path=tmp)
        return torch.load(Path(tmp) / "checkpoint.pt", weights_only=True)  # type: ignore[no-any-return]


def history(run_id: str) -> dict[str, dict[int, float]]:
    """Each metric's latest value per step."""
    client = MlflowClient()
    return {
        key: {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
        for key in METRICS
    }


def after(step: int, metrics: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {key: {s: v for s, v in values.items() if s > step} for key, values in metrics.items()}


def test_saves_every_n_steps_are_keyed_by_step_and_charted_by_global_step(scenario: Scenario) -> None:
    case, client = scenario.case, MlflowClient()
    saved = tracking.list_checkpoints(scenario.reference)
    assert [c.step for c in saved] == case.steps and {c.keyed_by for c in saved} == {"step"}
    assert {c.step: c.epoch for c in saved if c.step in case.epochs_done} == case.epochs_done
    names = {client.get_logged_model(str(c.model_id)).name for c in saved}
    assert names == {f"checkpoint-step-{step:08d}" for step in case.steps}
    params = client.get_run(scenario.reference).data.params
    assert (params["checkpoint_every_steps"], params["checkpoint_every"]) == (str(case.every), "none")
    # Each save validated where it was taken; each epoch's end is charted at its last step too.
    steps_per_epoch = case.steps[-1] // 3
    charted = set(history(scenario.reference)["val_loss"])
    assert charted == set(case.steps) | {steps_per_epoch, 2 * steps_per_epoch}
    # A save in mid-epoch keeps where the epoch stood, which its resume skips to.
    assert stored(scenario.reference, case.branched_at)["position"]["batches"] == case.branched_at


# Four fresh processes: make test-all's. make test has the child from mid-epoch, and the kill of a save by epoch
# (tests/unit/test_pipelines.py), which takes the same path.
@pytest.mark.slow
def test_a_run_killed_after_a_save_in_mid_epoch_resumes_in_place_as_the_straight_run(scenario: Scenario) -> None:
    case, client = scenario.case, MlflowClient()
    killed, killed_steps = scenario.killed
    assert max(killed_steps) == case.killed_at - case.every  # the save before the kill: mid-epoch 2
    run = client.get_run(killed)
    assert run.info.status == "FINISHED"
    assert run.data.tags[runs.TAG_RESUMED_FROM_STEP] == str(case.killed_at - case.every)
    assert run.data.tags[runs.TAG_RESUMED_FROM_EPOCH] == "1"
    assert_identical(stored(killed), stored(scenario.reference))
    assert history(killed) == history(scenario.reference)


def test_from_step_branches_a_child_from_mid_epoch_that_ends_as_the_straight_run(scenario: Scenario) -> None:
    case, client = scenario.case, MlflowClient()
    tags = client.get_run(scenario.child).data.tags
    assert tags[runs.TAG_RESUMED_FROM_RUN] == scenario.reference
    assert (tags[runs.TAG_BRANCHED_FROM_STEP], tags[runs.TAG_BRANCHED_FROM_EPOCH]) == (str(case.branched_at), "0")
    steps = [c.step for c in tracking.list_checkpoints(scenario.child)]
    assert steps == [step for step in case.steps if step > case.branched_at]
    assert_identical(stored(scenario.child), stored(scenario.reference))
    assert history(scenario.child) == after(case.branched_at, history(scenario.reference))


@pytest.fixture(scope="module")
def step_run(straight: Callable[[str], str]) -> str:
    """A run of pipelines.train saved every 4 steps, to try refusals on (the train scenario's reference)."""
    return straight("train")


@pytest.mark.parametrize(
    ("arguments", "code", "said"),
    [
        (["--checkpoint-every", "2", "--checkpoint-every-steps", "2"], 2, "a run saves by one of them"),
        (["--from-step", "4"], 2, "need --resume RUN_ID"),
        (["--resume", "{run}", "--from-step", "4", "--from-epoch", "1"], 2, "pass one"),
        (["--resume", "{run}", "--from-epoch", "1", "--new-run"], 1, "--from-step N with one of its steps"),
        (["--resume", "{run}", "--from-step", "20"], 1, "Add --new-run to branch a child run from step 20"),
        (["--resume", "{run}", "--from-step", "21", "--new-run"], 1, "committed steps: 4, 8, 12"),
        (["--resume", "{run}", "--checkpoint-every-steps", "5"], 1, "checkpoint_every_steps 4 -> 5"),
        (["--resume", "{run}", "--checkpoint-every", "1", "--override"], 1, "a run holds one kind of key"),
    ],
    ids=["both-intervals", "from-step-alone", "from-step-and-epoch", "from-epoch", "rewind", "missing-step",
         "other-steps", "by-epoch-overridden"],
)  # fmt: skip
def test_a_step_run_refuses_what_it_cannot_do_before_any_training(
    step_run: str, arguments: list[str], code: int, said: str
) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    before = len(client.search_runs([experiment.experiment_id]))
    ended = client.get_run(step_run).info.end_time

    done = inline(train.main, *(arg.format(run=step_run) for arg in arguments), "--epochs", "4", usage_exits=True)

    assert done.code == code, done
    lines = [line for line in done.err.splitlines() if said in line]
    assert len(lines) == 1, done.err
    assert len(client.search_runs([experiment.experiment_id])) == before
    assert client.get_run(step_run).info.end_time == ended  # the run was not touched


def rows_trained(monkeypatch: pytest.MonkeyPatch, *arguments: str) -> tuple[Outcome, list[int]]:
    """pipelines.train with ``arguments`` in this process, and the rows of the samples it trained on, in order."""
    loaded: list[int] = []

    class Recorded(TensorDataset):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
            loaded.append(int(index))
            return tuple(super().__getitem__(index))

    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data, "TensorDataset", Recorded)
        return inline(train.main, *arguments), loaded


def test_a_save_in_mid_epoch_resumed_with_another_batch_size_trains_the_samples_its_epoch_had_left(
    step_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 12 took 12 batches of 32, 384 of epoch 1's 455 samples: 24 batches of 16. The resume skipped 12 of 16
    # (192 samples) instead, and trained on 192 samples the epoch had already taken.
    child = ("--resume", step_run, "--from-step", "12", "--new-run", "--epochs", "1")
    kept, rows_kept = rows_trained(monkeypatch, *child)
    halved, rows_halved = rows_trained(monkeypatch, *child, "--batch-size", "16", "--override")

    assert kept.code == 0 and halved.code == 0, kept.err + halved.err
    assert len(rows_kept) == 455 - 384 and rows_halved == rows_kept
    # 71 samples in batches of 16 end epoch 1 at step 17; the save at step 16 keeps its position in them.
    assert [c.step for c in tracking.list_checkpoints(halved.run_id)] == [16, 17]
    position = stored(halved.run_id, 16)["position"]
    assert (position["batches"], position["batch_size"], position["sums"]["seen"]) == (28, 16, 448)

    # A save at an epoch's end goes on with any batch size: 455 samples in batches of 50 are 10 steps.
    later = inline(train.main, "--resume", step_run, "--new-run", "--epochs", "4", "--batch-size", "50", "--override")
    assert later.code == 0, later.err
    assert [c.step for c in tracking.list_checkpoints(later.run_id)][-1] == 45 + 10


def stopped_at_step(monkeypatch: pytest.MonkeyPatch, step: int, *arguments: str) -> str:
    """The run of pipelines.train with ``arguments``, Ctrl-C pressed once its save at global step ``step`` is made."""
    saved = tracking.Checkpointer.save

    def save(self: tracking.Checkpointer, *args: Any, **kwargs: Any) -> Any:
        done = saved(self, *args, **kwargs)
        if kwargs["step"] == step:
            raise KeyboardInterrupt
        return done

    with monkeypatch.context() as patch:
        patch.setattr(tracking.Checkpointer, "save", save)
        stopped = inline(train.main, *arguments)
    assert stopped.code == 130, stopped.err
    return stopped.run_id


def test_a_save_in_mid_epoch_refuses_another_seed_or_a_batch_size_its_samples_taken_do_not_fill_before_touching_the_run(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 384 samples are no whole number of batches of 50: it trained on, skipping 12 batches of 50 (600 samples).
    run_id = stopped_at_step(monkeypatch, 12, "--epochs", "2", "--checkpoint-every-steps", "4")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    before, runs_before = client.get_run(run_id), len(client.search_runs([experiment.experiment_id]))

    # Another seed draws another order: it trained on, skipping 12 batches of that one.
    changes = {
        ("--batch-size", "50"): "after 12 batches of 32 (384 samples), which are no whole number of batches of 50",
        ("--seed", "7"): "whose order of samples --seed 7 would not draw again",
    }
    for branch, (change, says) in itertools.product(([], ["--from-step", "12", "--new-run"]), changes.items()):
        done = inline(train.main, "--resume", run_id, *branch, *change, "--override")

        assert done.code == 1, done
        assert done.err.count("\n") == 1, done.err
        assert f"run {run_id}: its checkpoint at step 12 was saved in mid-epoch 1, {says}" in done.err
        after = client.get_run(run_id)
        assert after.data.tags == before.data.tags and after.info.status == before.info.status == "KILLED"
        assert len(client.search_runs([experiment.experiment_id])) == runs_before


def test_evaluate_charts_a_checkpoint_of_a_run_saved_by_steps_at_its_global_step(step_run: str) -> None:
    # Its eval_* went to the checkpoint's epoch (0 for step 12, 3 for step 45), away from the run's step charts.
    logged = history(step_run)
    for pick, step in ("12", 12), ("latest", 45):
        done = inline(evaluate.main, "--run-id", step_run, "--checkpoint", pick)

        assert done.code == 0, done.err
        assert f"(step {step}, " in done.out
        assert values_at(step_run, "eval_loss", step) == [logged["val_loss"][step]]
        assert values_at(step_run, "eval_accuracy", step) == [logged["val_accuracy"][step]]
    for epoch in 0, 3:
        assert values_at(step_run, "eval_loss", epoch) == []


def test_evaluate_charts_the_state_dict_and_whole_model_of_a_run_saved_by_steps_at_its_last_step(
    step_run: str,
) -> None:
    # They went to the run's epoch 3: step 3 of a chart whose every other point is a global step.
    logged = history(step_run)
    for pick in ["state_dict"], ["model", "--trust-pickle"]:
        done = inline(evaluate.main, "--run-id", step_run, "--checkpoint", *pick)

        assert done.code == 0, done.err
        assert "(step 45, 3 epochs completed)" in done.out and "note:" not in done.err
    # The weights the training ended with, whose validation the run charted at its last step.
    at_the_end = values_at(step_run, "eval_loss", 45)
    assert at_the_end and set(at_the_end) == {logged["val_loss"][45]}
    assert values_at(step_run, "eval_loss", 3) == []


def test_evaluate_of_weights_that_record_no_step_in_a_run_charted_by_step_says_the_axis_it_used(
    env: dict[str, str],
) -> None:
    # A run of pipelines.train saved by steps, whose state dict was logged before the pipelines recorded its step.
    with mlflow.start_run() as run:
        mlflow.log_params({"pipeline": train.TASK.name, "dataset": train.TASK.dataset, "checkpoint_every_steps": "8"})
        tracking.log_state_dict(train.TASK.build_model(data.load(train.TASK.dataset).n_features), epoch=1)

    done = inline(evaluate.main, "--run-id", run.info.run_id, "--checkpoint", "state_dict")

    assert done.code == 0, done.err
    assert "(epoch 1)" in done.out
    assert f"note: run {run.info.run_id} charts by global step, and its state_dict records no step" in done.err
    assert "charted at step 1, its epoch" in done.err
    assert len(values_at(run.info.run_id, "eval_loss", 1)) == 1
    # Nor an epoch (logged before the pipelines recorded that): at the run's last step, named a step.
    with mlflow.start_run(run.info.run_id):
        mlflow.log_metric("val_loss", 0.5, step=8)
        tracking.log_state_dict(train.TASK.build_model(data.load(train.TASK.dataset).n_features))
    done = inline(evaluate.main, "--run-id", run.info.run_id, "--checkpoint", "state_dict")
    assert done.code == 0 and "(step 8)" in done.out and "note:" not in done.err, done
    assert len(values_at(run.info.run_id, "eval_loss", 8)) == 1


@pytest.mark.parametrize(
    "sums", [{"seen": 384}, {"totals": torch.tensor([1.0, 2.0, 384.0], dtype=torch.float64)}], ids=["one", "torchrun"]
)
def test_a_position_saved_before_its_batch_size_was_kept_tells_it_from_the_samples_its_sums_counted(
    sums: dict[str, Any],
) -> None:
    position = Position.read({"batches": 12, "sums": sums})

    assert position is not None and (position.batch_size, position.samples) == (32, 384)
    halved = position.rebatched(16)
    assert halved is not None and (halved.batches, halved.batch_size, halved.sums) == (24, 16, sums)
    assert position.rebatched(50) is None
    kept = Position.read(Position(12, sums).saved(32))
    assert kept is not None and (kept.batches, kept.batch_size) == (12, 32)
