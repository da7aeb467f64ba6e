"""The Hugging Face pipeline as a command, on a sqlite tracking store and file:// artifacts: what it prints,
its charts (the epochs without a checkpoint at the same steps as those with one), and its saves every N
steps (keyed by step, resumed by run ID or from a step, exactly, and what such a run refuses)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

import tracking
from pipelines import noise
from tests.unit.conftest import use_store
from tests.unit.test_pipelines import inline
from tracking import layout

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


# --checkpoint-every-steps: 1,437 training rows in batches of 512 are 3 optimizer steps an epoch, so a save every
# 2 steps lands mid-epoch (step 2, step 4) and at the last step (3 after one epoch, 6 after two). In-process runs.
STEPS = ("--batch-size", "512", "--checkpoint-every-steps", "2", "--keep-last", "all")


@dataclass
class StepRuns:
    uri: str
    straight: str  # 2 epochs
    resumed: str  # 1 epoch, then --resume RUN_ID to 2
    branched: str  # --resume resumed --from-step 2 --new-run to 2: a child run from mid-epoch 1


def _inline(*args: str) -> tuple[int, str, str]:
    from pipelines import hf_digits

    done = inline(hf_digits.main, *args, usage_exits=True)
    return done.code, done.out, done.err


def _run_id(out: str) -> str:
    found = re.search(r"MLflow run ([0-9a-f]{32})", out)
    assert found, out
    return found.group(1)


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepRuns]:
    root = tmp_path_factory.mktemp("hf-steps")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, uri, EXPERIMENT)
        runs = []
        for args in (("--epochs", "2", *STEPS), ("--epochs", "1", *STEPS)):
            code, out, err = _inline(*args)
            assert code == 0, err[-3000:]
            runs.append(_run_id(out))
        straight, resumed = runs
        code, out, err = _inline("--resume", resumed, "--epochs", "2")
        assert code == 0 and _run_id(out) == resumed, err[-3000:]
        code, out, err = _inline("--resume", resumed, "--from-step", "2", "--new-run", "--epochs", "2")
        assert code == 0, err[-3000:]
        yield StepRuns(uri, straight, resumed, _run_id(out))


def _weights(run_id: str) -> dict[str, torch.Tensor]:
    import pipelines.hf_model  # noqa: F401  the recorded class's module, imported as a user's code would

    return dict(tracking.load(run_id).model.state_dict())


def test_checkpoint_every_steps_keys_the_run_by_step_and_a_resume_by_run_id_ends_as_the_straight_run(
    step_runs: StepRuns,
) -> None:
    client = MlflowClient(step_runs.uri)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    for run_id, steps in ((step_runs.straight, [2, 4, 6]), (step_runs.resumed, [2, 3, 4, 6])):
        saved = tracking.list_checkpoints(run_id, config=config)
        assert [c.step for c in saved] == steps
        assert {c.keyed_by for c in saved} == {"step"}
        names = {client.get_logged_model(str(c.model_id)).name for c in saved}
        assert names == {f"checkpoint-step-{step:08d}" for step in steps}
        params = client.get_run(run_id).data.params
        assert (params["checkpoint_every_steps"], params["checkpoint_every"]) == ("2", "none")
    tags = client.get_run(step_runs.resumed).data.tags
    assert (tags["tracking.resumed_from_step"], tags["tracking.resumed_from_epoch"]) == ("3", "1")
    straight = _weights(step_runs.straight)
    resumed = _weights(step_runs.resumed)
    assert all(torch.equal(resumed[name], value) for name, value in straight.items())


def test_from_step_branches_a_child_run_from_mid_epoch_that_ends_as_the_straight_run(step_runs: StepRuns) -> None:
    client = MlflowClient(step_runs.uri)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    tags = client.get_run(step_runs.branched).data.tags
    assert tags["mlflow.parentRunId"] == step_runs.resumed
    assert (tags["tracking.resumed_from_step"], tags["tracking.resumed_from_epoch"]) == ("2", "0")
    assert [c.step for c in tracking.list_checkpoints(step_runs.branched, config=config)] == [4, 6]
    straight = _weights(step_runs.straight)
    branched = _weights(step_runs.branched)
    assert all(torch.equal(branched[name], value) for name, value in straight.items())


@pytest.mark.slow  # the own-loop pipelines' case is in make test (tests/unit/test_pipelines.py)
def test_resume_from_a_checkpoints_models_uri_branches_from_that_step(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --resume models:/<a checkpoint> went on from the run's latest checkpoint, whichever one the URI named.
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    (step2,) = [c for c in tracking.list_checkpoints(step_runs.resumed, config=config) if c.step == 2]

    code, out, err = _inline("--resume", f"models:/{step2.model_id}", "--new-run", "--epochs", "2")

    assert code == 0, err[-3000:]
    tags = MlflowClient(step_runs.uri).get_run(_run_id(out)).data.tags
    assert (tags["mlflow.parentRunId"], tags["tracking.resumed_from_step"]) == (step_runs.resumed, "2")
    assert [c.step for c in tracking.list_checkpoints(_run_id(out), config=config)] == [4, 6]


def test_evaluate_refuses_a_frameworks_run_in_one_line_naming_what_lists_its_metrics(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its dataset is one evaluate knows: the loader then refused the model's class, saying to import a module.
    from pipelines import evaluate

    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = evaluate.main(["--run-id", step_runs.straight])
    assert code == 1 and err.getvalue().count("\n") == 1, err.getvalue()
    assert "trained by pipelines.hf_digits" in err.getvalue()
    assert f"`tracking checkpoints {step_runs.straight}`" in err.getvalue()


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["--checkpoint-every", "2", "--checkpoint-every-steps", "2"], 2, "a run saves by one of them"),
        (["--from-step", "2"], 2, "need --resume RUN_ID"),
        (["--resume", "{run}", "--from-step", "2", "--from-epoch", "1"], 2, "pass one"),
        (["--resume", "{run}", "--from-epoch", "1", "--new-run"], 1, "--from-step N with one of its steps"),
        (["--resume", "{run}", "--from-step", "4"], 1, "Add --new-run to branch a child run from step 4"),
        (["--resume", "{run}", "--checkpoint-every", "1"], 1, "checkpoint_every none -> 1"),
        (["--resume", "{run}", "--checkpoint-every-steps", "3"], 1, "checkpoint_every_steps 2 -> 3"),
        (["--resume", "{run}", "--checkpoint-every", "1", "--override"], 1, "a run holds one kind of key"),
        (["--resume", "{run}", "--from-step", "5"], 1, "committed steps: 2, 3, 4, 6"),
        (["--resume", "{run}", "--from-step", "5", "--new-run"], 1, "committed steps: 2, 3, 4, 6"),
        # From mid-epoch 1 the Trainer drew another order (--seed), or skipped 2 batches of the new size: either
        # trained some samples twice and others never.
        (
            ["--resume", "{run}", "--from-step", "2", "--new-run", "--override", "--seed", "5"],
            1,
            "at step 2 was saved in mid-epoch 1, whose order of samples --seed 5 would not draw again",
        ),
        (
            ["--resume", "{run}", "--from-step", "2", "--new-run", "--override", "--batch-size", "256"],
            1,
            "at step 2 was saved in mid-epoch 1, after 2 batches of 512 (1024 samples), which the Trainer would skip",
        ),
        # At epoch 1's end (step 3), 256 makes an epoch 6 steps: the Trainer went on at step 3 of epoch 1.
        (
            ["--resume", "{run}", "--from-step", "3", "--new-run", "--override", "--batch-size", "256"],
            1,
            "at step 3 ends epoch 1 of 3 steps in batches of 512; in batches of 256 an epoch is 6 steps",
        ),
        # ... and it said to pass "one that makes an epoch 3 steps", leaving users to work out which.
        (
            ["--resume", "{run}", "--from-step", "3", "--new-run", "--override", "--batch-size", "256"],
            1,
            "or pass one that makes an epoch 3 steps (--batch-size 479 to 718).",
        ),
    ],
    ids=[
        "both-intervals",
        "from-step-alone",
        "from-step-and-epoch",
        "from-epoch",
        "rewind",
        "by-epoch",
        "other-steps",
        "by-epoch-overridden",
        "missing-step",
        "missing-step-new-run",
        "mid-epoch-seed",
        "mid-epoch-batch-size",
        "epoch-end-batch-size",
        "epoch-end-batch-sizes-listed",
    ],
)
def test_a_step_run_refuses_what_it_cannot_do_before_any_training(
    step_runs: StepRuns, args: list[str], code: int, said: str
) -> None:
    client = MlflowClient(step_runs.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    before = len(client.search_runs([experiment.experiment_id]))
    run = step_runs.resumed
    status = client.get_run(run).info
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, step_runs.uri, EXPERIMENT)
        done = _inline(*(arg.format(run=run) for arg in args), "--epochs", "3")
    assert done[0] == code, done
    lines = [line for line in done[2].splitlines() if said in line]
    assert len(lines) == 1, done[2]
    if code == 1:
        assert run in lines[0], lines[0]
    assert len(client.search_runs([experiment.experiment_id])) == before
    after = client.get_run(run).info
    assert (after.status, after.end_time) == (status.status, status.end_time)
    steps = [c.step for c in tracking.list_checkpoints(run, config=tracking.TrackingConfig(tracking_uri=step_runs.uri))]
    assert steps == [2, 3, 4, 6]


def test_from_an_epochs_end_a_batch_size_of_as_many_steps_an_epoch_trains_the_next_epoch_as_a_straight_run(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,437 rows in batches of 480 are 3 steps an epoch, as in batches of 512: from epoch 1's end (step 3) the Trainer
    # counts 1 epoch trained and none of epoch 2 to skip, and trains epoch 2 as a run in batches of 480 from the start.
    from pipelines.hf_model import DigitsClassifier

    batches: list[torch.Tensor] = []  # every training batch's rows, in the order trained
    forward = DigitsClassifier.forward

    def recorded(self: DigitsClassifier, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        if self.training:
            batches.append(x.clone())
        return forward(self, x, labels)

    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    monkeypatch.setattr(DigitsClassifier, "forward", recorded)
    code, out, err = _inline(
        "--resume", step_runs.resumed, "--from-step", "3", "--new-run", "--override", "--batch-size", "480",
        "--epochs", "2",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    child, resumed = _run_id(out), batches[:]
    batches.clear()
    code, out, err = _inline(
        "--epochs", "2", "--batch-size", "480", "--checkpoint-every-steps", "2", "--keep-last", "all"
    )  # fmt: skip
    assert code == 0, err[-3000:]
    straight = _run_id(out)

    assert [len(batch) for batch in batches] == [480, 480, 477] * 2
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(resumed, batches[3:], strict=True))
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    saved = tracking.list_checkpoints(child, config=config)
    assert [(c.step, c.epoch) for c in saved] == [(4, 1), (6, 2)]
    assert [(c.step, c.epoch) for c in tracking.list_checkpoints(straight, config=config)][1:] == [(4, 1), (6, 2)]
    client = MlflowClient(step_runs.uri)
    for key in ("loss", "eval_loss"):
        assert sorted(m.step for m in client.get_metric_history(child, key)) == [4, 6], key
    run = client.get_run(child)
    assert run.data.params["batch_size"] == "480"
    assert run.data.tags["tracking.overrides"] == "from step 3: batch_size 512 -> 480"


def test_a_resume_on_another_number_of_ranks_than_saved_the_checkpoint_is_refused_before_any_training(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Trainer counts an epoch in steps of one rank's share of its batches: on 2 ranks, the checkpoint one process
    # saved at step 6 (epoch 2's end, of 3 steps an epoch) is 3 epochs of 2 steps, and it would go on at epoch 4.
    # Here the process is told it is one of 2 ranks (tests/distributed has a run of 2 ranks resumed in one process).
    from tracking.parallel import distributed

    client = MlflowClient(step_runs.uri)
    experiment = client.get_run(step_runs.resumed).info.experiment_id
    before = client.search_runs([experiment])
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    code, _, err = _inline("--resume", step_runs.resumed, "--new-run", "--epochs", "3")

    said = "at step 6 was saved by one process, and this resume runs on 2 ranks: the Trainer would split an epoch"
    assert code == 1 and err.count("\n") == 1 and said in err, err
    assert f"`python -m pipelines.hf_digits --resume {step_runs.resumed} ...`" in err
    assert [run.info.run_id for run in client.search_runs([experiment])] == [run.info.run_id for run in before]


@pytest.mark.parametrize(
    ("files", "world", "said"),
    [
        ({"rng_state.pth"}, 1, None),
        ({"rng_state_0.pth", "rng_state_1.pth"}, 2, None),
        (
            {"rng_state_0.pth", "rng_state_1.pth"},
            1,
            "saved by 2 ranks, and this resume runs in one process: the Trainer would split an epoch into other "
            "batches per rank and count the epochs trained in those, going on at another place in another epoch, "
            "without the ranks' RNG states. Resume it as it was saved: `torchrun --nproc-per-node 2 -m "
            "pipelines.hf_digits --resume RUN ...`.",
        ),
        # Files that do not tell how many ranks saved them: rank 1's is missing (it was taken for one process's),
        # or no rank's RNG state was saved.
        ({"rng_state_0.pth"}, 2, None),
        (set(), 2, None),
    ],
    ids=["one-process", "two-ranks", "two-ranks-in-one-process", "a-rank-missing", "no-rng-state"],
)
def test_the_ranks_that_saved_a_checkpoint_are_told_by_its_rng_state_files(
    files: set[str], world: int, said: str | None
) -> None:
    from pipelines import hf_digits, hf_resume, runs

    manifest = SimpleNamespace(files={name: None for name in {"trainer_state.json", *files}}, step=48)
    located = SimpleNamespace(run_id="RUN", manifest=manifest)
    if said is None:
        hf_resume.check_ranks(located, world, hf_digits.NAME)
        return
    with pytest.raises(runs.PipelineError) as refused:
        hf_resume.check_ranks(located, world, hf_digits.NAME)
    assert str(refused.value) == f"run RUN: its checkpoint at step 48 was {said}"


def test_an_overridden_checkpoint_every_steps_is_the_one_a_resumed_training_saves_by(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Trainer takes save_steps and eval_steps from the resumed folder's trainer_state.json (every 2 here):
    # --override --checkpoint-every-steps 3 must be what the resumed training saves and evaluates by.
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    code, out, err = _inline(
        "--resume", step_runs.straight, "--new-run", "--override", "--checkpoint-every-steps", "3", "--epochs", "4"
    )
    assert code == 0, err[-3000:]
    child = _run_id(out)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    # Steps 7 to 12: a save every 3 steps is at 9 and 12 (the last), none at 8 or 10.
    assert [c.step for c in tracking.list_checkpoints(child, config=config)] == [9, 12]
    assert MlflowClient(step_runs.uri).get_run(child).data.params["checkpoint_every_steps"] == "3"
    assert {m.step for m in MlflowClient(step_runs.uri).get_metric_history(child, "eval_loss")} == {9, 12}


def test_an_overridden_learning_rate_is_the_one_a_resumed_training_steps_with_and_is_recorded(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Trainer restores the optimizer's and the scheduler's learning rate from the resumed folder.
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    code, out, err = _inline("--resume", step_runs.straight, "--new-run", "--override", "--lr", "0.05", "--epochs", "3")
    assert code == 0, err[-3000:]
    child = _run_id(out)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    saved = tracking.list_checkpoints(child, config=config)
    assert [c.step for c in saved] == [8, 9]
    assert saved[0].metrics["learning_rate"] == 0.05  # logged every 2 steps: at step 8, not at the last
    run = MlflowClient(step_runs.uri).get_run(child)
    assert run.data.params["lr"] == "0.05"
    assert run.data.tags["tracking.overrides"] == "from step 6: lr 0.005 -> 0.05"


def _two_epochs_keeping_the_last_two_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, tracking.TrackingConfig, str]:
    """A store of its own, and a run of it: 2 epochs saved every 2 steps, --keep-last 2 (steps 4 and 6)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    use_store(monkeypatch, uri, EXPERIMENT)
    code, out, err = _inline(
        "--epochs", "2", "--batch-size", "512", "--checkpoint-every-steps", "2", "--keep-last", "2"
    )
    assert code == 0, err[-3000:]
    return uri, tracking.TrackingConfig(tracking_uri=uri), _run_id(out)


def test_keep_last_holds_across_a_resume_whose_trainer_never_saw_the_earlier_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Trainer rotates only the folders in its output_dir: a resume has the one it starts from.
    uri, config, run_id = _two_epochs_keeping_the_last_two_steps(tmp_path, monkeypatch)
    assert [c.step for c in tracking.list_checkpoints(run_id, config=config)] == [4, 6]
    code, _, err = _inline("--resume", run_id, "--epochs", "4")
    assert code == 0, err[-3000:]
    saved = tracking.list_checkpoints(run_id, config=config)
    best = MlflowClient(uri).get_run(run_id).data.tags[layout.TAG_BEST]
    assert [c.step for c in saved][-2:] == [10, 12] and len(saved) <= 3
    assert {c.model_id for c in saved} == {best, saved[-2].model_id, saved[-1].model_id}


@pytest.mark.slow  # the own-loop pipelines' case is in make test (tests/unit/test_pipelines.py)
def test_an_override_of_keep_last_holds_for_the_runs_later_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's params cannot change: a later plain --resume took --keep-last 2 back and pruned the run to it.
    uri, config, run_id = _two_epochs_keeping_the_last_two_steps(tmp_path, monkeypatch)
    code, _, err = _inline("--resume", run_id, "--epochs", "3", "--override", "--keep-last", "all")
    assert code == 0, err[-3000:]
    code, _, err = _inline("--resume", run_id, "--epochs", "4")
    assert code == 0, err[-3000:]
    assert [c.step for c in tracking.list_checkpoints(run_id, config=config)] == [4, 6, 8, 9, 10, 12]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["tracking.override.keep_last"] == "all"
    assert tags["tracking.overrides"] == "from step 6: keep_last 2 -> all"


@pytest.mark.slow  # the own-loop pipelines' case is in make test (tests/unit/test_pipelines.py)
def test_keep_best_all_keeps_every_checkpoint(step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch) -> None:
    # --keep-best all was taken as 1: the Trainer kept the last (--keep-last 1) and the best save alone.
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    code, out, err = _inline("--epochs", "3", "--keep-last", "1", "--keep-best", "all")
    assert code == 0, err[-3000:]
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    assert [c.epoch for c in tracking.list_checkpoints(_run_id(out), config=config)] == [1, 2, 3]


def test_ctrl_c_ends_the_run_killed_and_says_how_to_go_on_in_one_line(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C printed a traceback and left the run FAILED, as if training had crashed.
    from tracking.integrations.transformers import TrackingCallback

    saved = TrackingCallback.on_save

    def on_save(self: TrackingCallback, *args: Any, **kwargs: Any) -> Any:
        saved(self, *args, **kwargs)
        raise KeyboardInterrupt  # once the first epoch's checkpoint is committed

    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    with monkeypatch.context() as patch:
        patch.setattr(TrackingCallback, "on_save", on_save)
        try:
            code, out, err = _inline("--epochs", "2", "--batch-size", "512")
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the pipeline: Python prints its traceback", pytrace=False)

    assert code == 130 and err.count("\n") == 1, err
    run_id = _run_id(out)
    assert f"`python -m pipelines.hf_digits --resume {run_id} --epochs 2`" in err
    assert MlflowClient(step_runs.uri).get_run(run_id).info.status == "KILLED"


def test_an_overridden_seed_draws_from_there_on(step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Trainer restored the checkpoint's RNG states over it: the child recorded seed 5, and only its data
    # order (seeded by the Trainer from --seed) took it; its dropout drew on from seed 0's states.
    from tracking.integrations.transformers import TrackingCallback

    first_steps: list[torch.Tensor] = []  # the RNG state each child's first step (after step 6) draws dropout from

    def on_step_begin(self: TrackingCallback, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 6:
            first_steps.append(torch.random.get_rng_state())

    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    monkeypatch.setattr(TrackingCallback, "on_step_begin", on_step_begin)
    branch = ("--resume", step_runs.straight, "--new-run", "--epochs", "3")
    children = [_inline(*branch, *more) for more in ((), ("--override", "--seed", "5"), ("--override", "--seed", "5"))]
    assert all(code == 0 for code, _, _ in children), [err[-3000:] for _, _, err in children]
    reseeded, again = (_run_id(out) for _, out, _ in children[1:])

    assert MlflowClient(step_runs.uri).get_run(reseeded).data.params["seed"] == "5"
    assert not torch.equal(first_steps[1], first_steps[0])
    assert torch.equal(first_steps[2], first_steps[1])  # still exactly repeatable
    weights, repeated = _weights(reseeded), _weights(again)
    assert all(torch.equal(value, repeated[name]) for name, value in weights.items())


def test_a_resume_without_epochs_goes_on_to_the_runs_target(
    step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run recorded no target: a plain --resume trained on to the pipeline's default 6 epochs.
    client = MlflowClient(step_runs.uri)
    assert [
        client.get_run(run_id).data.tags["tracking.epochs"] for run_id in (step_runs.straight, step_runs.resumed)
    ] == [
        "2",
        "2",
    ]
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    runs_before = len(client.search_runs([client.get_run(step_runs.straight).info.experiment_id]))

    code, _, err = _inline("--resume", step_runs.straight, "--new-run")

    assert code == 1 and "already reached epoch 2 and its target (tag tracking.epochs) is 2" in err, err
    assert len(client.search_runs([client.get_run(step_runs.straight).info.experiment_id])) == runs_before


def test_a_child_records_the_step_it_branched_from_once(step_runs: StepRuns, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child recorded where its latest resume began (tracking.resumed_from_*), which its in-place resumes move,
    # and nothing that kept its branch point.
    use_store(monkeypatch, step_runs.uri, EXPERIMENT)
    code, out, err = _inline("--resume", step_runs.straight, "--from-step", "4", "--new-run")
    assert code == 0, err[-3000:]
    child = _run_id(out)
    config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
    assert [c.step for c in tracking.list_checkpoints(child, config=config)] == [6]  # to its parent's target
    code, _, err = _inline("--resume", child, "--epochs", "3")
    assert code == 0, err[-3000:]

    tags = MlflowClient(step_runs.uri).get_run(child).data.tags
    assert (tags["tracking.branched_from_step"], tags["tracking.branched_from_epoch"]) == ("4", "1")
    assert (tags["tracking.resumed_from_step"], tags["tracking.resumed_from_epoch"]) == ("6", "2")
    assert (tags["tracking.epochs"], tags["tracking.resumes"]) == ("3", "1")


@pytest.mark.parametrize(
    ("steps", "world", "devices", "said"),
    [
        (3, 1, 1, " (--batch-size 479 to 718)"),  # 1,437 rows: 3 steps from 479 (ceil 2.99...) up to 718
        (1, 1, 1, " (--batch-size 1437 or more)"),
        (2, 2, 1, " (--batch-size 360 to 718)"),  # 2 steps a rank: 3 or 4 batches shared by 2 ranks
        (3, 1, 2, " (--batch-size 240 to 359)"),  # each GPU's batch, the process's split over 2 of them
        (1000, 1, 1, ""),  # no batch size makes an epoch of 1,437 rows 1,000 steps
    ],
)
def test_the_batch_sizes_that_keep_an_epochs_steps_are_listed_as_one_span(
    steps: int, world: int, devices: int, said: str
) -> None:
    from pipelines import hf_resume

    assert hf_resume.batch_sizes_for(steps, 1437, world, devices) == said


def test_a_run_whose_training_still_runs_here_is_refused_before_anything_is_touched(step_runs: StepRuns) -> None:
    # The Trainer's resume of a run its own training still trained overwrote that training's checkpoints.
    client = MlflowClient(step_runs.uri)
    run_id = step_runs.straight
    before = client.get_run(run_id).info
    trainer = json.loads(client.get_run(run_id).data.tags["tracking.trainer"])
    assert (trainer["host"], trainer["pid"]) == (socket.gethostname(), os.getpid())  # trained inline, here
    client.update_run(run_id, "RUNNING")
    try:
        with pytest.MonkeyPatch.context() as patch:
            use_store(patch, step_runs.uri, EXPERIMENT)
            code, _, err = _inline("--resume", run_id, "--epochs", "3")
        assert code == 2 and err.count("\n") == 1, err
        assert f"process {os.getpid()} on this host" in err and f"(kill {os.getpid()})" in err
        config = tracking.TrackingConfig(tracking_uri=step_runs.uri)
        assert [c.step for c in tracking.list_checkpoints(run_id, config=config)] == [2, 4, 6]
    finally:
        client.set_terminated(run_id, before.status, end_time=before.end_time)
