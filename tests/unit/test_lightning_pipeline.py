"""The Lightning pipeline as a command, on a sqlite tracking store and file:// artifacts: its saves every N
steps (keyed by step; the last one at the end of training), a resume by run ID that ends as a run that never
stopped, from the end of a run or from mid-epoch, and what a run saved by steps refuses.

1,437 training rows in batches of 512 are 3 optimizer steps an epoch: a save every 2 steps lands mid-epoch
(steps 2, 4 and 8), on the last batch of epoch 2 (step 6: the save is made at that epoch's end, after its
validation), and a run ends with a save at its last step (3 after one epoch). The runs are in-process (the
pipeline's ``main``) but for the one killed mid-save.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

import tracking
from pipelines import lightning_digits
from tests.unit.conftest import use_store
from tests.unit.test_pipelines import Outcome
from tests.unit.test_pipelines import inline as pipeline_inline

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "lightning-pipeline"
STEPS = ("--batch-size", "512", "--checkpoint-every-steps", "2", "--keep-last", "all")


def inline(*args: str) -> Outcome:
    return pipeline_inline(lightning_digits.main, *args, usage_exits=True)


@dataclass
class Runs:
    env: dict[str, str]
    config: tracking.TrackingConfig
    straight: str  # 3 epochs
    resumed: str  # 1 epoch, then --resume RUN_ID to 2, then to 3


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("lightning-steps")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    variables = {"MLFLOW_TRACKING_URI": uri, "TRACKING_EXPERIMENT": EXPERIMENT}
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, uri, EXPERIMENT)
        straight, first = inline("--epochs", "3", *STEPS), inline("--epochs", "1", *STEPS)
        assert straight.code == 0 and first.code == 0, straight.err[-3000:] + first.err[-3000:]
        # From step 3 (the end of a run), then from step 6 (a save due at an epoch's last batch).
        for epochs in ("2", "3"):
            resumed = inline("--resume", first.run_id, "--epochs", epochs)
            assert resumed.code == 0 and resumed.run_id == first.run_id, resumed.err[-3000:]
        yield Runs(
            {**os.environ, **variables}, tracking.TrackingConfig(tracking_uri=uri), straight.run_id, first.run_id
        )


def assert_same_training(run_id: str, reference: str, config: tracking.TrackingConfig) -> None:
    """The latest checkpoints of both runs hold the same weights and optimizer state, bit for bit."""
    import pipelines.lightning_modules  # noqa: F401  the recorded class's module, imported as a user's code would

    ours, theirs = (
        tracking.load(run_id, mode="train", config=config),
        tracking.load(reference, mode="train", config=config),
    )
    assert (ours.epoch, ours.step) == (theirs.epoch, theirs.step)
    expected = theirs.model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in ours.model.state_dict().items())
    assert ours.optimizer is not None and theirs.optimizer is not None
    state, reference_state = ours.optimizer.state_dict()["state"], theirs.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][k], v) for i, entry in reference_state.items() for k, v in entry.items())


def test_checkpoint_every_steps_keys_the_run_by_step_and_a_resume_by_run_id_ends_as_the_straight_run(
    step_runs: Runs,
) -> None:
    client = MlflowClient(step_runs.config.tracking_uri)
    for run_id, steps in ((step_runs.straight, [2, 4, 6, 8, 9]), (step_runs.resumed, [2, 3, 4, 6, 8, 9])):
        saved = tracking.list_checkpoints(run_id, config=step_runs.config)
        assert [c.step for c in saved] == steps
        names = {client.get_logged_model(str(c.model_id)).name for c in saved}
        assert names == {f"checkpoint-step-{step:08d}" for step in steps}
        params = client.get_run(run_id).data.params
        assert (params["checkpoint_every_steps"], params["checkpoint_every"]) == ("2", "none")
    assert_same_training(step_runs.resumed, step_runs.straight, step_runs.config)


# A pipeline process killed mid-save (about 15 s): make test-all runs it.
@pytest.mark.slow
def test_a_run_killed_in_its_last_save_resumes_from_mid_epoch_as_the_straight_run(step_runs: Runs) -> None:
    fault = ["tests.unit.fault", "checkpoint-step-00000009/checkpoint.pt", "pipelines.lightning_digits"]
    killed = subprocess.run(
        [sys.executable, "-m", *fault, "--epochs", "3", *STEPS],
        cwd=ROOT,
        env=step_runs.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_id = Outcome(killed.returncode, killed.stdout, killed.stderr).run_id
    # The latest checkpoint is step 8: epoch 3's second batch of 3. The loader resumes at its third.
    latest = tracking.find_checkpoint(run_id, config=step_runs.config).manifest
    assert (latest.step, latest.epoch) == (8, 2)
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
        resumed = inline("--resume", run_id, "--epochs", "3")
    assert resumed.code == 0, resumed.err[-3000:]
    assert [c.step for c in tracking.list_checkpoints(run_id, config=step_runs.config)] == [2, 4, 6, 8, 9]
    assert_same_training(run_id, step_runs.straight, step_runs.config)


def test_checkpoint_every_n_epochs_also_saves_the_last_epoch(step_runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    done = inline("--epochs", "2", "--batch-size", "512", "--checkpoint-every", "3")
    assert done.code == 0, done.err[-3000:]
    saved = tracking.list_checkpoints(done.run_id, config=step_runs.config)
    # Lightning counts epochs from 0: the second epoch's end, where the training stopped.
    assert [(c.keyed_by, c.epoch, c.step) for c in saved] == [("epoch", 1, 6)]
    # The user counts from 1, as the own-loop pipelines do: the pipeline said "epoch 1" after 2 epochs.
    assert f"latest checkpoint: epoch 2 (Lightning's epoch=1), models:/{saved[0].model_id}" in done.out, done.out


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["--checkpoint-every", "2", "--checkpoint-every-steps", "2"], 2, "a run saves by one of them"),
        (["--resume", "{run}", "--from-step", "2"], 2, "--from-step, --new-run and --strategy are the other"),
        (["--resume", "{run}", "--checkpoint-every", "1"], 1, "checkpoint_every none -> 1"),
        (["--resume", "{run}", "--checkpoint-every", "1", "--override"], 1, "a run holds one kind of key"),
        (["--resume", "{run}", "--epochs", "3"], 1, "already reached epoch 3 and --epochs is 3"),
        # A models:/ URI of an earlier checkpoint went on from the latest one instead.
        (["--resume", "{step4}"], 1, "at step 4, not its latest (step 9)"),
    ],
    ids=["both-intervals", "from-step", "by-epoch", "by-epoch-overridden", "trained-already", "earlier-checkpoint"],
)
def test_a_step_run_refuses_what_it_cannot_do_before_it_is_touched(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, said: str
) -> None:
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    client = MlflowClient(step_runs.config.tracking_uri)
    before = client.get_run(step_runs.resumed)
    (step4,) = [c for c in tracking.list_checkpoints(step_runs.resumed, config=step_runs.config) if c.step == 4]
    given = (arg.format(run=step_runs.resumed, step4=f"models:/{step4.model_id}") for arg in args)
    done = inline("--epochs", "4", *given)
    assert done.code == code, done
    lines = [line for line in done.err.splitlines() if said in line]
    assert len(lines) == 1, done.err
    if code == 1:
        assert step_runs.resumed in lines[0], lines[0]
    after = client.get_run(step_runs.resumed)
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        before.info.status,
        before.info.end_time,
        before.data.tags,
    )
    steps = [c.step for c in tracking.list_checkpoints(step_runs.resumed, config=step_runs.config)]
    assert steps == [2, 3, 4, 6, 8, 9]


def test_a_run_no_pipeline_trained_is_refused_saying_to_train_a_new_one(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run of the user's own code (no pipeline param) was sent to `python -m None`.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    client = MlflowClient(step_runs.config.tracking_uri)
    run_id = client.create_run(client.get_run(step_runs.straight).info.experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.1")
    client.set_terminated(run_id)

    done = inline("--resume", run_id, "--epochs", "2")

    assert done.code == 1 and done.err.count("\n") == 1, done.err
    assert done.err == (
        f"error: run {run_id} records no pipeline param: no training pipeline trained it, so "
        "pipelines.lightning_digits cannot tell what its checkpoints hold; train a new run instead (leave out "
        "--resume).\n"
    )
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_overridden_learning_rate_is_the_one_a_resumed_fit_steps_with_and_is_recorded(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning restores the optimizer's and the scheduler's learning rate from the checkpoint.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    first = inline("--epochs", "1", *STEPS)
    assert first.code == 0, first.err[-3000:]
    resumed = inline("--resume", first.run_id, "--override", "--lr", "0.01", "--epochs", "2")
    assert resumed.code == 0, resumed.err[-3000:]
    loaded = tracking.load(first.run_id, mode="train", config=step_runs.config)
    assert loaded.step == 6 and loaded.optimizer is not None
    assert [group["lr"] for group in loaded.optimizer.param_groups] == [0.01]
    tags = MlflowClient(step_runs.config.tracking_uri).get_run(first.run_id).data.tags
    assert tags["tracking.overrides"] == "from step 3: lr 0.001 -> 0.01"


def test_keep_last_holds_across_a_resume_that_overrides_the_interval(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning restores a ModelCheckpoint's kept files only into one of the same state key, which names its
    # interval: with another --checkpoint-every-steps the resumed fit would never remove the earlier files.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    first = inline("--epochs", "1", "--batch-size", "512", "--checkpoint-every-steps", "2", "--keep-last", "2")
    assert first.code == 0, first.err[-3000:]
    assert [c.step for c in tracking.list_checkpoints(first.run_id, config=step_runs.config)] == [2, 3]
    resumed = inline("--resume", first.run_id, "--override", "--checkpoint-every-steps", "1", "--epochs", "2")
    assert resumed.code == 0, resumed.err[-3000:]
    steps = [c.step for c in tracking.list_checkpoints(first.run_id, config=step_runs.config)]
    # The last 2 (steps 5 and 6), and the best by val_loss: step 6's validation beat step 3's.
    assert steps == [5, 6], steps
    # The override holds for the run's later resumes: the interval is the run's own now, given again or not.
    tags = MlflowClient(step_runs.config.tracking_uri).get_run(first.run_id).data.tags
    assert tags["tracking.override.checkpoint_every_steps"] == "1"
    again = inline("--resume", first.run_id, "--checkpoint-every-steps", "1", "--epochs", "3")
    assert again.code == 0, again.err[-3000:]
    steps = [c.step for c in tracking.list_checkpoints(first.run_id, config=step_runs.config)]
    assert steps == [8, 9], steps  # none of the earlier best ones kept


@pytest.mark.slow  # the own-loop pipelines' case is in make test (tests/unit/test_pipelines.py)
def test_keep_best_all_keeps_every_checkpoint(step_runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    # --keep-best all added no best ModelCheckpoint at all: --keep-last 1 alone held the run to its last save.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    done = inline("--epochs", "3", "--keep-last", "1", "--keep-best", "all")
    assert done.code == 0, done.err[-3000:]
    assert len(tracking.list_checkpoints(done.run_id, config=step_runs.config)) == 3


def interrupted_when_epoch_starts(monkeypatch: pytest.MonkeyPatch, epoch: int, *args: str) -> Outcome:
    """The pipeline with ``args``, Ctrl-C pressed from a callback as Lightning's epoch ``epoch`` (from 0) starts."""
    from tracking.integrations.lightning import MLflowCheckpoints

    started = MLflowCheckpoints.on_train_epoch_start

    def on_train_epoch_start(self: MLflowCheckpoints, trainer: Any, pl_module: Any) -> None:
        started(self, trainer, pl_module)
        if trainer.current_epoch == epoch:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MLflowCheckpoints, "on_train_epoch_start", on_train_epoch_start)
        try:
            return inline(*args)
        except (KeyboardInterrupt, SystemExit):
            pytest.fail("Ctrl-C escaped the pipeline: Python prints its traceback", pytrace=False)


def test_ctrl_c_ends_the_run_killed_and_says_how_to_go_on_in_one_line(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning catches Ctrl-C itself, ignores SIGINT from then on and exits 1: the run ended FAILED.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    handler = signal.getsignal(signal.SIGINT)
    stopped = interrupted_when_epoch_starts(monkeypatch, 1, "--epochs", "2", "--batch-size", "512")

    assert stopped.code == 130 and stopped.err.count("\n") == 1, stopped.err
    run_id = stopped.run_id
    assert f"`python -m pipelines.lightning_digits --resume {run_id} --epochs 2`" in stopped.err
    client = MlflowClient(step_runs.config.tracking_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler  # a second Ctrl-C stops the process again
    resumed = inline("--resume", run_id, "--epochs", "2")
    assert resumed.code == 0, resumed.err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_plain_resume_goes_on_with_the_learning_rate_an_override_left_in_the_runs_tags(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The override's resume stopped before its first save: the run's tag said lr 0.01, and a plain resume
    # trained on with the checkpoint's 0.001.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    first = inline("--epochs", "1", "--batch-size", "512")
    assert first.code == 0, first.err[-3000:]
    run_id = first.run_id
    override = ("--resume", run_id, "--override", "--lr", "0.01", "--epochs", "2")
    assert interrupted_when_epoch_starts(monkeypatch, 1, *override).code == 130
    tags = MlflowClient(step_runs.config.tracking_uri).get_run(run_id).data.tags
    # Where the override starts, counted as the user counts: after epoch 1 (Lightning's epoch=0).
    assert (tags["tracking.overrides"], tags["tracking.override.lr"]) == ("from epoch 1: lr 0.001 -> 0.01", "0.01")

    resumed = inline("--resume", run_id, "--epochs", "2")

    assert resumed.code == 0, resumed.err[-3000:]
    loaded = tracking.load(run_id, mode="train", config=step_runs.config)
    assert loaded.optimizer is not None
    assert [group["lr"] for group in loaded.optimizer.param_groups] == [0.01]


def test_runs_of_the_same_seed_get_different_names(step_runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    # A local store draws a new run's name from Python's RNG in this process, after the pipeline seeded it.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    first, second = (inline("--epochs", "1", "--batch-size", "512") for _ in range(2))

    client = MlflowClient(step_runs.config.tracking_uri)
    names = {client.get_run(outcome.run_id).info.run_name for outcome in (first, second)}
    assert len(names) == 2, names


def test_a_resume_goes_on_to_the_runs_target_and_one_with_epochs_sets_a_new_one(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run recorded no target: a plain --resume trained on to the pipeline's default 10 epochs.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    client = MlflowClient(step_runs.config.tracking_uri)
    stopped = interrupted_when_epoch_starts(monkeypatch, 1, "--epochs", "2", "--batch-size", "512")
    assert stopped.code == 130, stopped.err
    run_id = stopped.run_id
    assert client.get_run(run_id).data.tags["tracking.epochs"] == "2"

    resumed = inline("--resume", run_id)

    assert resumed.code == 0, resumed.err[-3000:]
    assert tracking.find_checkpoint(run_id, config=step_runs.config).manifest.epoch == 1  # Lightning's: the 2nd
    further = inline("--resume", run_id, "--epochs", "3")
    assert further.code == 0, further.err[-3000:]
    tags = client.get_run(run_id).data.tags
    assert (tags["tracking.epochs"], tags["tracking.resumed_from_epoch"], tags["tracking.resumes"]) == ("3", "2", "2")
    done = inline("--resume", run_id)
    assert done.code == 1 and "its target (tag tracking.epochs) is 3" in done.err, done.err


def test_an_overridden_seed_draws_from_there_on(step_runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflowCheckpoints restored the checkpoint's RNG states over the new seed: the resumed run recorded seed 5,
    # and only its loader's order took it; its dropout drew on from seed 0's states.
    from tracking.integrations.lightning import MLflowCheckpoints

    first_steps: list[torch.Tensor] = []  # the RNG state each resumed fit's first step (after step 3) draws from
    started = MLflowCheckpoints.on_train_batch_start

    def on_train_batch_start(self: MLflowCheckpoints, trainer: Any, pl_module: Any, batch: Any, index: int) -> None:
        started(self, trainer, pl_module, batch, index)
        if trainer.global_step == 3:
            first_steps.append(torch.random.get_rng_state())

    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    monkeypatch.setattr(MLflowCheckpoints, "on_train_batch_start", on_train_batch_start)
    firsts = [inline("--epochs", "1", "--batch-size", "512") for _ in range(3)]
    assert all(first.code == 0 for first in firsts), [first.err[-3000:] for first in firsts]
    more: list[tuple[str, ...]] = [(), ("--override", "--seed", "5"), ("--override", "--seed", "5")]
    resumed = [
        inline("--resume", first.run_id, "--epochs", "2", *args) for first, args in zip(firsts, more, strict=True)
    ]
    assert all(done.code == 0 for done in resumed), [done.err[-3000:] for done in resumed]

    reseeded, again = (done.run_id for done in resumed[1:])
    tags = MlflowClient(step_runs.config.tracking_uri).get_run(reseeded).data.tags
    assert (tags["tracking.override.seed"], tags["tracking.overrides"]) == ("5", "from epoch 1: seed 0 -> 5")
    assert len(first_steps) == 3
    assert not torch.equal(first_steps[1], first_steps[0])
    assert torch.equal(first_steps[2], first_steps[1])  # still exactly repeatable
    assert_same_training(reseeded, again, step_runs.config)


def killed_in_mid_epoch(monkeypatch: pytest.MonkeyPatch) -> str:
    """A run of 2 epochs stopped by Ctrl-C as it was to take its third batch: its latest checkpoint is step 2, in
    mid-epoch 1, after 2 batches of 512 (1,024 samples)."""
    from tracking.integrations.lightning import MLflowCheckpoints

    started = MLflowCheckpoints.on_train_batch_start

    def on_train_batch_start(self: MLflowCheckpoints, trainer: Any, pl_module: Any, batch: Any, index: int) -> None:
        started(self, trainer, pl_module, batch, index)
        if trainer.global_step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MLflowCheckpoints, "on_train_batch_start", on_train_batch_start)
        stopped = inline("--epochs", "2", *STEPS)
    assert stopped.code == 130, stopped.err[-3000:]
    return stopped.run_id


@pytest.fixture(scope="module")
def mid_epoch_run(step_runs: Runs) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
        yield killed_in_mid_epoch(patch)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--seed", "5"], "whose order of samples --seed 5 would not draw again"),
        (["--batch-size", "300"], "after 2 batches of 512 (1024 samples), which are no whole number of batches of 300"),
    ],
    ids=["seed", "batch-size"],
)
def test_a_save_in_mid_epoch_refuses_another_seed_or_batches_its_samples_taken_do_not_make_before_it_is_touched(
    step_runs: Runs, mid_epoch_run: str, monkeypatch: pytest.MonkeyPatch, args: list[str], said: str
) -> None:
    # The resumed epoch drew another order (--seed) and skipped the 1,024 samples taken in it, or rebatched the
    # samples taken: either trained some of its samples twice and others never.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    client = MlflowClient(step_runs.config.tracking_uri)
    before = client.get_run(mid_epoch_run)

    done = inline("--resume", mid_epoch_run, "--override", *args)

    assert done.code == 1 and done.err.count("\n") == 1, done.err
    where = f"run {mid_epoch_run}: its checkpoint at step 2 was saved in mid-epoch 1"
    assert where in done.err and said in done.err and "resume from a save at an epoch's end" in done.err, done.err
    after = client.get_run(mid_epoch_run)
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        before.info.status,
        before.info.end_time,
        before.data.tags,
    )
    assert [c.step for c in tracking.list_checkpoints(mid_epoch_run, config=step_runs.config)] == [2]


def test_a_save_in_mid_epoch_goes_on_in_batches_of_another_size_that_its_samples_taken_make(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loader skipped the 1,024 samples taken, but Lightning counted the epoch's batches on from the checkpoint's
    # 2 (of 512): with 256, epoch 1 ended at batch 4 of the 6 it counted to, neither validated nor stepped its
    # scheduler, and epoch 2 validated alone.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    from pipelines.lightning_modules import LitDigits

    run_id = killed_in_mid_epoch(monkeypatch)
    validations: list[int] = []  # the epoch (from 1) of each validation of the resumed fit
    monkeypatch.setattr(
        LitDigits, "on_validation_start", lambda module: validations.append(module.trainer.current_epoch + 1)
    )

    done = inline("--resume", run_id, "--override", "--batch-size", "256")

    assert done.code == 0, done.err[-3000:]
    located = tracking.find_checkpoint(run_id, config=step_runs.config)
    saved = torch.load(io.BytesIO(bytes(located.read("checkpoint.pt"))), weights_only=True)
    # 4 of 256 (2 + 2 that take the 413 left) to epoch 1's end, then 6: the scheduler stepped at both ends.
    assert (saved["epoch"], saved["global_step"]) == (1, 10)
    assert [scheduler["last_epoch"] for scheduler in saved["lr_schedulers"]] == [2]
    assert validations == [1, 2]


def test_a_run_whose_training_still_runs_here_is_refused_before_anything_is_touched(
    step_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's resume of a run its own training still trained overwrote that training's checkpoints.
    use_store(monkeypatch, step_runs.env["MLFLOW_TRACKING_URI"], EXPERIMENT)
    client = MlflowClient(step_runs.config.tracking_uri)
    run_id = step_runs.straight
    before = client.get_run(run_id)
    trainer = json.loads(before.data.tags["tracking.trainer"])
    assert (trainer["host"], trainer["pid"]) == (socket.gethostname(), os.getpid())  # trained inline, here
    client.update_run(run_id, "RUNNING")
    try:
        done = inline("--resume", run_id, "--epochs", "4")
        assert done.code == 2 and done.err.count("\n") == 1, done.err
        assert f"process {os.getpid()} on this host" in done.err and f"(kill {os.getpid()})" in done.err
        assert client.get_run(run_id).data.metrics == before.data.metrics
    finally:
        client.set_terminated(run_id, before.info.status, end_time=before.info.end_time)
