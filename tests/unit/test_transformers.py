"""The Hugging Face Trainer integration: each save a checkpoint logged model, retention mirrored, exact resume by
run ID, tracking.load on its checkpoints; an in-process Trainer on a tiny model, moto S3 and a sqlite store."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

import tracking
from pipelines import data
from pipelines.hf_model import DigitsClassifier, DigitsConfig, Examples, accuracy
from tracking import layout
from tracking.cli import main
from tracking.errors import StorageError, TrackingError
from tracking.integrations import transformers as integration
from tracking.integrations.transformers import TrackingCallback, checkpoint_folder
from tracking.integrations.transformers import callback as hf_callback
from tracking.parallel import distributed

FILES = {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


@pytest.fixture(scope="module")
def split() -> data.Split:
    full = data.load("digits")
    # A slice keeps an epoch to a few steps: 256 rows in batches of 32.
    return data.Split(full.x_train[:256], full.y_train[:256], full.x_val[:64], full.y_val[:64])


class StopAfter(TrainerCallback):  # type: ignore[misc]
    """Ends training after ``epochs`` epochs of a longer schedule: a job that stopped (was killed) midway."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if round(state.epoch) >= self.epochs:
            control.should_training_stop = True


class Scores(TrainerCallback):  # type: ignore[misc]
    """Replaces each evaluation's ``eval_score`` with the next of ``values``: a best checkpoint that is not the last."""

    def __init__(self, values: list[float]) -> None:
        self.values = iter(values)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kwargs: Any) -> None:
        metrics["eval_score"] = next(self.values)


def make_trainer(
    split: data.Split, output_dir: Path, callbacks: list[Any], epochs: int = 3, **overrides: Any
) -> Trainer:
    torch.manual_seed(0)
    model = DigitsClassifier(DigitsConfig(hidden=16))
    settings: dict[str, Any] = {
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "save_strategy": "epoch",
        "eval_strategy": "epoch",
        "logging_strategy": "epoch",
        "report_to": "none",
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **overrides,
    }
    return Trainer(
        model=model,
        args=TrainingArguments(str(output_dir), **settings),
        train_dataset=Examples(split.x_train, split.y_train),
        eval_dataset=Examples(split.x_val, split.y_val),
        compute_metrics=accuracy,
        callbacks=callbacks,
    )


def by_steps(every: int) -> dict[str, Any]:
    """Settings for a save, an evaluation and a loss log every ``every`` global steps (HF's usual pairing)."""
    return {
        "save_strategy": "steps",
        "save_steps": every,
        "eval_strategy": "steps",
        "eval_steps": every,
        "logging_strategy": "steps",
        "logging_steps": every,
    }


class StopAtStep(TrainerCallback):  # type: ignore[misc]
    """Ends training after global step ``step`` of a longer schedule: a job killed mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def trained(s3_experiment: str, split: data.Split, tmp_path: Path) -> Iterator[tuple[str, Trainer]]:
    """A run trained 3 epochs with the callback (background uploads): its ID and its Trainer."""
    with mlflow.start_run() as run:
        trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()])
        trainer.train()
    yield run.info.run_id, trainer


def test_each_save_is_one_checkpoint_with_every_file_and_its_metrics(trained: tuple[str, Trainer]) -> None:
    run_id, trainer = trained
    found = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in found] == [1, 2, 3]
    assert [c.step for c in found] == [8, 16, 24]
    out = Path(trainer.args.output_dir)
    for checkpoint in found:
        folder = out / f"checkpoint-{checkpoint.step}"
        assert checkpoint.manifest.format == "transformers" and checkpoint.manifest.kind == "checkpoint"
        assert set(checkpoint.manifest.files) == {p.name for p in folder.iterdir()} >= FILES
        for name, stored in checkpoint.manifest.files.items():
            assert (stored.size, stored.sha256) == ((folder / name).stat().st_size, sha256(folder / name))
        logged = {e["step"]: e for e in trainer.state.log_history if "eval_loss" in e}[checkpoint.step]
        assert checkpoint.metrics["eval_loss"] == logged["eval_loss"]
        assert {"loss", "eval_accuracy", "learning_rate"} <= set(checkpoint.metrics)
        assert "epoch" not in checkpoint.metrics and "step" not in checkpoint.metrics
    manifest = found[-1].manifest
    assert manifest.model["class"] == "pipelines.hf_model:DigitsClassifier"
    assert manifest.optimizer is not None and manifest.optimizer["class"] == "torch.optim.adamw:AdamW"
    assert manifest.versions["transformers"]
    # The run's pointers and its description, as the pipelines' checkpoints have them.
    tags = mlflow.get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST] == found[-1].model_id
    assert "checkpoint_folder" in tags["mlflow.note.content"] and found[-1].model_id in tags["mlflow.note.content"]
    assert not (out / integration.STAGING).exists() or not any((out / integration.STAGING).iterdir())


def test_save_total_limit_and_the_best_checkpoint_are_mirrored(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with mlflow.start_run() as run:
        trainer = make_trainer(
            split,
            out,
            [Scores([0.5, 0.9, 0.3, 0.2]), TrackingCallback()],
            epochs=4,
            save_total_limit=2,
            metric_for_best_model="score",
            greater_is_better=True,
        )
        trainer.train()
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == [16, 32]  # the Trainer kept the best (epoch 2) and the last
    found = {c.epoch: c for c in tracking.list_checkpoints(run.info.run_id)}
    assert sorted(found) == [2, 4]
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags[layout.TAG_BEST] == found[2].model_id and tags[layout.TAG_LATEST] == found[4].model_id
    assert (tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == ("eval_score", "max")
    assert tracking.find_checkpoint(run.info.run_id, "best").manifest.step == 16
    # Deleted as retention deletes: no logged model left behind for the epochs the Trainer rotated out.
    client = mlflow.MlflowClient()
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == [layout.checkpoint_name(2), layout.checkpoint_name(4)]


def test_resume_from_a_run_id_repeats_the_straight_run(s3_experiment: str, split: data.Split, tmp_path: Path) -> None:
    straight = make_trainer(split, tmp_path / "straight", [], epochs=4)
    straight.train()
    with mlflow.start_run() as run:
        first = make_trainer(split, tmp_path / "first", [StopAfter(2), TrackingCallback()], epochs=4)
        first.train()
    run_id = run.info.run_id
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2]
    # Elsewhere, from the run ID alone: the latest checkpoint as the Trainer's folder, into the same run.
    elsewhere = tmp_path / "elsewhere"
    folder = checkpoint_folder(run_id, output_dir=elsewhere)
    assert Path(folder) == elsewhere / "checkpoint-16"
    resumed = make_trainer(split, elsewhere, [TrackingCallback(run_id=run_id)], epochs=4)
    resumed.train(resume_from_checkpoint=folder)
    assert losses(resumed) == losses(straight)
    final, expected = weights(resumed.model), weights(straight.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    found = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in found] == [1, 2, 3, 4]
    loaded = tracking.load(run_id)
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)


# load_best_model_at_end with its best checkpoint early: epoch 1's of 4 (SCORES), before a resume after epoch 2.
BEST_EARLY = {
    "save_total_limit": 2,
    "metric_for_best_model": "score",
    "greater_is_better": True,
    "load_best_model_at_end": True,
}
SCORES = [0.9, 0.5, 0.3, 0.2]


@pytest.fixture
def stopped_after_the_best(s3_experiment: str, split: data.Split, tmp_path: Path) -> str:
    """A run of BEST_EARLY stopped after epoch 2, its folders gone (as on another machine): its ID."""
    with mlflow.start_run() as run:
        callbacks = [Scores(SCORES[:2]), StopAfter(2), TrackingCallback()]
        make_trainer(split, tmp_path / "first", callbacks, 4, **BEST_EARLY).train()
    shutil.rmtree(tmp_path / "first")
    return str(run.info.run_id)


def test_a_resume_from_a_run_id_ends_with_the_best_checkpoint_and_keeps_those_of_the_straight_run(
    stopped_after_the_best: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        straight = make_trainer(split, tmp_path / "straight", [Scores(SCORES), TrackingCallback()], 4, **BEST_EARLY)
        straight.train()
    kept = [c.epoch for c in tracking.list_checkpoints(run.info.run_id)]
    assert kept == [1, 4]  # the Trainer kept the best beside the last
    run_id = stopped_after_the_best
    elsewhere = tmp_path / "elsewhere"
    folder = checkpoint_folder(run_id, output_dir=elsewhere)
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(elsewhere / "checkpoint-8")
    # The best beside it holds the model alone, not the state only a resume from it would need.
    assert {p.name for p in (elsewhere / "checkpoint-8").iterdir()} == {
        "config.json",
        "model.safetensors",
        "training_args.bin",
        "manifest.json",
    }
    resumed = make_trainer(split, elsewhere, [Scores(SCORES[2:]), TrackingCallback(run_id=run_id)], 4, **BEST_EARLY)
    trainer_log = logging.getLogger("transformers.trainer")  # the Trainer's own logging may not propagate
    trainer_log.addHandler(caplog.handler)
    try:
        resumed.train(resume_from_checkpoint=folder)
    finally:
        trainer_log.removeHandler(caplog.handler)
    assert "does not exist anymore" not in caplog.text
    assert losses(resumed) == losses(straight)
    final, best = weights(resumed.model), weights(straight.model)
    assert all(torch.equal(final[k], best[k]) for k in best)  # epoch 1's, loaded at the end
    assert resumed.state.best_model_checkpoint == str(elsewhere / "checkpoint-8")
    # The Trainer's rotation kept the best as the straight run's did, and the run mirrored it.
    assert sorted(p.name for p in elsewhere.glob("checkpoint-*")) == ["checkpoint-32", "checkpoint-8"]
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == kept


def test_the_ranks_of_a_machine_share_the_best_checkpoint_its_first_rank_materialised(
    stopped_after_the_best: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []  # what this process asked of the run and the store
    find, download_files = integration.folders.find_checkpoint, integration.folders.download_files

    def found(*args: Any, **kwargs: Any) -> Any:
        asked.append("found")
        return find(*args, **kwargs)

    def download(located: Any, to: Path, **kwargs: Any) -> Any:
        asked.append(f"downloaded {to.name}")
        return download_files(located, to, **kwargs)

    def elsewhere_on_rank0(step: Any, **kwargs: Any) -> Any:
        done = step()
        if machines == "a machine per rank":
            shutil.rmtree(output)  # rank 0's disk is another machine's
        return done

    def raise_together(error: BaseException | None) -> None:
        if error is not None:
            raise error

    # Rank 1 of two, in this process: rank 0's part (on_rank0) is run here too, its folders where it leaves them.
    monkeypatch.setattr(integration.folders, "find_checkpoint", found)
    monkeypatch.setattr(integration.folders, "download_files", download)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "raise_together", raise_together)
    monkeypatch.setattr(distributed, "on_rank0", elsewhere_on_rank0)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    for machines, local_rank in [("one machine", 1), ("a machine per rank", 0)]:
        monkeypatch.setattr(distributed, "local_rank", lambda local_rank=local_rank: local_rank)
        output = tmp_path / machines.replace(" ", "-")
        asked.clear()
        folder = Path(checkpoint_folder(stopped_after_the_best, output_dir=output))
        # Rank 0 looks up the resumed checkpoint and its best and downloads both; rank 1 uses them as they are on
        # the disk they share, or on a disk of its own does the same.
        expected = ["found", "found", "downloaded checkpoint-8", "downloaded checkpoint-16"]
        assert asked == (expected if machines == "one machine" else expected * 2), machines
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(output / "checkpoint-8"), machines


def test_a_best_checkpoint_the_run_no_longer_holds_is_said_once_and_dropped(
    s3_experiment: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Epoch 1's best, then epoch 3's: the Trainer's rotation (save_total_limit=2) took epoch 1 from the run.
    with mlflow.start_run() as run:
        callbacks = [Scores([0.9, 0.5, 0.95]), TrackingCallback()]
        make_trainer(split, tmp_path / "first", callbacks, 3, **BEST_EARLY).train()
    run_id = run.info.run_id
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [2, 3]
    elsewhere = tmp_path / "elsewhere"
    with caplog.at_level(logging.WARNING, logger=integration.folders.__name__):
        folder = Path(checkpoint_folder(run_id, 2, output_dir=elsewhere))
    (warned,) = [r.getMessage() for r in caplog.records if r.name == integration.folders.__name__]
    assert warned.startswith(f"run {run_id}: checkpoint-epoch-0002") and "step 8" in warned, warned
    assert "no longer holds" in warned and "load_best_model_at_end" in warned and "\n" not in warned
    assert sorted(p.name for p in elsewhere.iterdir()) == ["checkpoint-16"]
    # The Trainer resumes without it, keeping the best metric, as its own check would after a warning that the
    # saving process's folder does not exist anymore.
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["best_model_checkpoint"], state["best_metric"]) == (None, 0.9)


def test_load_rebuilds_the_model_and_with_mode_train_the_optimizer(
    trained: tuple[str, Trainer], tmp_path: Path
) -> None:
    run_id, trainer = trained
    expected = weights(trainer.model)
    loaded = tracking.load(run_id)
    assert isinstance(loaded.model, DigitsClassifier) and not loaded.model.training
    assert (loaded.epoch, loaded.step, loaded.optimizer) == (3, 24, None)
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)
    with pytest.warns(RuntimeWarning, match="scheduler=<a factory"):
        resumable = tracking.load(run_id, mode="train")
    assert resumable.model.training and isinstance(resumable.optimizer, torch.optim.AdamW)
    saved = trainer.optimizer.state_dict()
    state = resumable.optimizer.state_dict()
    assert [g["weight_decay"] for g in state["param_groups"]] == [g["weight_decay"] for g in saved["param_groups"]]
    for index, entry in saved["state"].items():
        assert all(torch.equal(state["state"][index][k], v) for k, v in entry.items())
    # The Trainer's schedule is a lambda: a factory brings it back with its state.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduled = tracking.load(
            run_id, mode="train", scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0)
        )
    assert scheduled.scheduler.last_epoch == 24
    # The transformers-native path: from_pretrained on the folder materialised from the run ID.
    native = DigitsClassifier.from_pretrained(checkpoint_folder(run_id, 2, output_dir=tmp_path / "native"))
    second = tracking.load(run_id, 2)
    assert all(torch.equal(native.state_dict()[k], v) for k, v in second.model.state_dict().items())
    assert all(torch.equal(tracking.load_model(run_id).state_dict()[k], v) for k, v in expected.items())
    assert set(tracking.load_state_dict(run_id)) == set(expected)


def test_load_in_eval_mode_uses_the_factories_it_is_given_as_for_every_checkpoint(
    trained: tuple[str, Trainer], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, trainer = trained
    # The Trainer's AdamW groups the parameters it decays apart from the others: a factory groups them alike.
    names = [name for name, _ in trainer.model.named_parameters()]
    groups = tracking.find_checkpoint(run_id).manifest.optimizer["param_groups"]

    def adamw(parameters: Any) -> torch.optim.Optimizer:
        by_name = dict(zip(names, parameters, strict=True))
        return torch.optim.AdamW([{"params": [by_name[name] for name in group["params"]]} for group in groups])

    def constant(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    saved = trainer.optimizer.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no factory is left unused, and no scheduler left out
        both = tracking.load(run_id, optimizer=adamw, scheduler=constant)
        # A scheduler's factory alone: the optimizer it drives is rebuilt from the folder's manifest.
        scheduled = tracking.load(run_id, scheduler=constant)
    for loaded in (both, scheduled):
        assert not loaded.model.training and isinstance(loaded.optimizer, torch.optim.AdamW)
        assert loaded.scheduler.last_epoch == 24
        state = loaded.optimizer.state_dict()["state"]
        for index, entry in saved["state"].items():
            assert all(torch.equal(state[index][k], v) for k, v in entry.items())
    # The scheduler left out for want of a factory is said once for a job, on rank 0 (every rank loads).
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tracking.load(run_id, mode="train").scheduler is None


def test_the_command_line_lists_shows_verifies_downloads_and_registers(
    trained: tuple[str, Trainer], tmp_path: Path
) -> None:
    run_id, _ = trained
    runner = CliRunner()
    listed = runner.invoke(main, ["checkpoints", run_id, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [c["epoch"] for c in json.loads(listed.stdout)] == [1, 2, 3]
    shown = runner.invoke(main, ["show", run_id, "--checkpoint", "2"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["format"] == "transformers" and json.loads(shown.stdout)["step"] == 16
    verified = runner.invoke(main, ["verify", run_id])
    assert verified.exit_code == 0 and "BAD" not in verified.output, verified.output
    downloaded = runner.invoke(main, ["download", run_id, "--checkpoint", "2", "--to", str(tmp_path / "dl")])
    assert downloaded.exit_code == 0, downloaded.output
    assert {p.name for p in (tmp_path / "dl").iterdir()} >= FILES | {"manifest.json"}
    registered = runner.invoke(main, ["register", run_id, "hf-digits", "--checkpoint", "latest", "--alias", "champion"])
    assert registered.exit_code == 0, registered.output
    by_alias = tracking.load("models:/hf-digits@champion")
    assert (by_alias.epoch, type(by_alias.model)) == (3, DigitsClassifier)


def test_checkpoint_folder_before_a_process_group_of_several_warns_that_each_process_downloads(
    trained: tuple[str, Trainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, _ = trained
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's, before the Trainer starts the process group
    with caplog.at_level(logging.WARNING, logger="tracking.integrations.transformers.folders"):
        folder = checkpoint_folder(run_id, output_dir=tmp_path / "early")
    assert "every process downloads" in caplog.text and "once the Trainer is made" in caplog.text
    assert {p.name for p in Path(folder).iterdir()} >= FILES


def test_a_failed_upload_is_not_silent(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = hf_callback.commit_local_files

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].epoch)
        if args[1].epoch == 1:
            raise StorageError("the store refused the upload")
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_callback, "commit_local_files", failing)
    with mlflow.start_run() as run:
        trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()])
        # Epoch 1's upload fails in the background: epoch 2's save says so, and training stops there.
        with pytest.raises(StorageError, match="refused the upload"):
            trainer.train()
    assert calls == [1] and round(trainer.state.epoch) == 2
    assert tracking.list_checkpoints(run.info.run_id) == []


def test_a_failed_last_upload_fails_the_end_of_training(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("the store refused the upload")

    monkeypatch.setattr(hf_callback, "commit_local_files", failing)
    with mlflow.start_run(), pytest.raises(StorageError, match="refused the upload"):
        make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1).train()


def test_a_killed_jobs_staged_files_are_removed_when_training_resumes_in_its_output_dir(
    trained: tuple[str, Trainer], split: data.Split, tmp_path: Path
) -> None:
    run_id, _ = trained
    out = tmp_path / "out"
    # A job killed mid-upload leaves its staged links behind: they keep a rotated-out checkpoint's bytes on disk.
    left = out / ".tracking-staging" / "checkpoint-16-killed"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"the bytes of a checkpoint the Trainer rotated out")
    with mlflow.start_run(run_id=run_id):
        resumed = make_trainer(split, out, [TrackingCallback()], epochs=4)
        resumed.train(resume_from_checkpoint=checkpoint_folder(run_id, output_dir=out))
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2, 3, 4]
    # Nothing left but the Trainer's folders: the leftovers went as training started, staging once it ended.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-16", "checkpoint-24", "checkpoint-32", "checkpoint-8"]


def upload_threads() -> int:
    return sum(t.name == "tracking-async-save" for t in threading.enumerate())


def test_each_training_stops_its_upload_thread_so_a_sweep_leaves_none_behind(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    before = upload_threads()
    for trial in range(3):  # a sweep: a Trainer and a callback per trial
        with mlflow.start_run() as run:
            make_trainer(split, tmp_path / f"trial-{trial}", [TrackingCallback()], epochs=1).train()
        assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]  # committed before it stopped
        assert upload_threads() == before
    # A callback made but never trained starts none; one trained twice starts one for each train().
    callback = TrackingCallback()
    assert upload_threads() == before
    with mlflow.start_run() as run:
        trainer = make_trainer(split, tmp_path / "twice", [callback], epochs=1)
        trainer.train()
        trainer.train(resume_from_checkpoint=str(tmp_path / "twice" / "checkpoint-8"))
    assert upload_threads() == before


class RaiseAtStep(TrainerCallback):  # type: ignore[misc]
    """Raises as global step ``step`` + 1 begins, once ``raised`` is set: user code failing inside train()."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.raised = threading.Event()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            self.raised.set()
            raise RuntimeError("a bug in the training step (test)")


@pytest.mark.parametrize("upload_fails", [False, True])
def test_a_training_that_raises_finishes_the_upload_it_queued_and_leaves_no_upload_thread(
    s3_experiment: str,
    split: data.Split,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upload_fails: bool,
) -> None:
    # The Trainer calls no callback when train() raises: a sweep or notebook that catches the error must not keep
    # the upload thread, nor lose (or never hear of) the upload queued before the error.
    before = upload_threads()
    failing = RaiseAtStep(8)  # epoch 1 ends at step 8 with a save; step 9 raises
    commit = hf_callback.commit_local_files

    def held_commit(*args: Any, **kwargs: Any) -> Any:
        assert failing.raised.wait(timeout=20), "training never raised"  # still uploading as it raises
        if upload_fails:
            raise StorageError("the store refused the upload (test)")
        return commit(*args, **kwargs)

    monkeypatch.setattr(hf_callback, "commit_local_files", held_commit)
    with mlflow.start_run() as run, caplog.at_level(logging.ERROR):
        trainer = make_trainer(split, tmp_path / "out", [failing, TrackingCallback()])
        with pytest.raises(RuntimeError, match="a bug in the training step"):
            trainer.train()
        deadline = time.monotonic() + 10
        while upload_threads() != before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert upload_threads() == before
    if upload_fails:
        assert any("refused the upload" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        with pytest.raises(StorageError, match="refused the upload"):  # and raised by the process's next read
            tracking.list_checkpoints(run.info.run_id)
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == ([] if upload_fails else [1])


def test_files_are_staged_so_the_trainer_rotation_cannot_take_them_mid_upload(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    committed: dict[int, Mapping[str, Any]] = {}
    original = hf_callback.commit_local_files

    def slow(handle: Any, manifest: Any, files: Mapping[str, Path], **kwargs: Any) -> Any:
        if manifest.epoch == 1:
            # Upload epoch 1 only once the Trainer's rotation (save_total_limit=1, at epoch 2's save) deleted it.
            gone = threading.Event()
            while not gone.wait(0.05):
                if not (out / "checkpoint-8").exists():
                    gone.set()
        logged = original(handle, manifest, files, **kwargs)
        committed[manifest.epoch] = logged.manifest.files
        return logged

    monkeypatch.setattr(hf_callback, "commit_local_files", slow)
    with mlflow.start_run() as run:
        make_trainer(split, out, [TrackingCallback()], epochs=2, save_total_limit=1).train()
    assert set(committed[1]) >= FILES
    # Committed whole, then deleted: its folder was rotated out.
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2]


@pytest.mark.parametrize(
    ("strategy", "fix"),
    [("no", "save_strategy='steps'"), ("best", "save_strategy='steps'")],
)
def test_other_save_strategies_are_refused_with_the_fix(
    s3_experiment: str, split: data.Split, tmp_path: Path, strategy: str, fix: str
) -> None:
    with mlflow.start_run() as run:
        trainer = make_trainer(
            split, tmp_path / "out", [TrackingCallback()], save_strategy=strategy, metric_for_best_model="loss"
        )
        with pytest.raises(ValueError, match=f"save_strategy={strategy!r}") as refused:
            trainer.train()
    message = str(refused.value)
    assert fix in message and "\n" not in message
    assert trainer.state.global_step == 0 and tracking.list_checkpoints(run.info.run_id) == []


def test_every_n_epochs_with_save_strategy_steps_is_refused_with_the_fix(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    with mlflow.start_run():
        trainer = make_trainer(split, tmp_path / "out", [TrackingCallback(every_n_epochs=2)], **by_steps(5))
        with pytest.raises(ValueError, match="every_n_epochs=2") as refused:
            trainer.train()
    assert "save_steps" in str(refused.value) and trainer.state.global_step == 0


def test_every_n_epochs_saves_only_due_epochs_and_the_last(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with mlflow.start_run() as run:
        make_trainer(split, out, [TrackingCallback(every_n_epochs=2)], epochs=3).train()
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2, 3]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]


def test_every_n_epochs_with_max_steps_saves_only_due_epochs_and_the_last(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    # max_steps=40 trains 5 epochs of 8 steps; num_train_epochs (3 by default) is ignored, and epoch 3 is not last.
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "out", [TrackingCallback(every_n_epochs=2)], max_steps=40).train()
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2, 4, 5]


def test_every_n_epochs_saves_the_epoch_an_early_stop_ends_training_at(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    # Epoch 3 of 5 scores worse than epoch 2: EarlyStoppingCallback (patience 1, listed after the tracking callback)
    # stops training there. Unsaved, the run could resume only from epoch 2, and train it again.
    out = tmp_path / "out"
    stop = EarlyStoppingCallback(early_stopping_patience=1)
    best = {"metric_for_best_model": "score", "greater_is_better": False, "load_best_model_at_end": True}
    with mlflow.start_run() as run:
        trainer = make_trainer(
            split, out, [Scores([0.5, 0.3, 0.6]), TrackingCallback(every_n_epochs=2), stop], epochs=5, **best
        )
        trainer.train()
    assert round(trainer.state.epoch) == 3
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2, 3]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]
    assert tracking.find_checkpoint(run.info.run_id, "best").manifest.epoch == 2  # the Trainer's best stays
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-16")
    # A callback that stops training at an epoch's end (a time budget) is an early stop too.
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "budget", [StopAfter(3), TrackingCallback(every_n_epochs=2)], epochs=5).train()
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [2, 3]


def test_every_n_epochs_leaves_the_trainers_best_among_the_epochs_it_saves(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    # Epoch 1 scores best but is not saved: the Trainer took it for its best, so no later save was, its rotation
    # (save_total_limit=1) deleted epoch 2's checkpoint, the best saved, from its folder and the run, and
    # load_best_model_at_end loaded none.
    out = tmp_path / "out"
    callbacks = [Scores([0.3, 0.5, 0.6, 0.7]), TrackingCallback(every_n_epochs=2)]
    best = {"metric_for_best_model": "score", "greater_is_better": False, "load_best_model_at_end": True}
    with mlflow.start_run() as run:
        trainer = make_trainer(split, out, callbacks, epochs=4, save_total_limit=1, **best)
        trainer.train()
    run_id = run.info.run_id
    # The Trainer keeps its best (and, at the end of training with save_total_limit=1, deletes the last folder).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16"]
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [2, 4]
    assert tracking.find_checkpoint(run_id, "best").manifest.epoch == 2
    assert (trainer.state.best_model_checkpoint, trainer.state.best_metric) == (str(out / "checkpoint-16"), 0.5)
    loaded = tracking.load(run_id, "best").model
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in loaded.state_dict().items())  # loaded


def test_the_trainer_mlflow_integration_and_the_callback_share_one_run(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.get_experiment_by_name("unit-s3").experiment_id)
    trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1, report_to="mlflow")
    trainer.train()
    runs = mlflow.search_runs(output_format="list")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    assert "eval_loss" in runs[0].data.metrics


def test_a_second_train_after_the_trainers_mlflow_logging_ended_its_run_says_how_to_go_on_in_it(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.get_experiment_by_name("unit-s3").experiment_id)
    trainer = make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1, report_to="mlflow")
    trainer.train()
    run_id = mlflow.search_runs(output_format="list")[0].info.run_id
    with pytest.raises(ValueError, match=re.escape(f'with mlflow.start_run(run_id="{run_id}")')) as refused:
        trainer.train()  # the Trainer's MLflowCallback ended its run at the end of the first
    assert "report_to" in str(refused.value) and "checkpoint_folder" in str(refused.value)
    with mlflow.start_run(run_id=run_id), pytest.raises(TrackingError, match="starts afresh"):
        trainer.train()  # a second training from scratch would rewrite the run's checkpoints
    with mlflow.start_run(run_id=run_id):  # as the error says: from the run's latest, in the one run
        trainer.train(resume_from_checkpoint=checkpoint_folder(run_id, output_dir=tmp_path / "out"))
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    assert len(mlflow.search_runs(output_format="list")) == 1


def test_checkpoint_metrics_are_charted_at_the_steps_the_trainers_mlflow_logging_uses(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.get_experiment_by_name("unit-s3").experiment_id)
    trainer = make_trainer(
        split, tmp_path / "out", [TrackingCallback(async_upload=False)], epochs=2, report_to="mlflow"
    )
    trainer.train()
    run_id = mlflow.search_runs(output_format="list")[0].info.run_id
    saved = tracking.list_checkpoints(run_id)
    assert [c.step for c in saved] == [8, 16]
    client = mlflow.MlflowClient()
    for key in ("eval_loss", "eval_accuracy", "loss"):
        # The Trainer's MLflowCallback logs each log_history entry at its global step.
        logged = {entry["step"] for entry in trainer.state.log_history if key in entry}
        assert logged == {8, 16}, key
        charted = {m.step for m in client.get_metric_history(run_id, key)}
        assert charted == logged, f"{key}: stray points at {sorted(charted - logged)}"
    for checkpoint in saved:
        model_steps = {m.key: m.step for m in client.get_logged_model(str(checkpoint.model_id)).metrics}
        assert model_steps["eval_loss"] == checkpoint.step, model_steps


def top_one(prediction: Any) -> dict[str, float]:
    """``compute_metrics`` naming its metric with characters MLflow refuses, which the Trainer's own MLflow logging
    replaces with ``_``."""
    return {"acc(top1)": accuracy(prediction)["accuracy"]}


def test_metric_names_mlflow_refuses_are_logged_as_the_trainers_mlflow_logging_logs_them(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.get_experiment_by_name("unit-s3").experiment_id)
    trainer = make_trainer(
        split, tmp_path / "out", [TrackingCallback()], epochs=2, report_to="mlflow", metric_for_best_model="acc(top1)"
    )
    trainer.compute_metrics = top_one
    trainer.train()
    run_id = mlflow.search_runs(output_format="list")[0].info.run_id
    saved = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in saved] == [1, 2]
    # Under the key the Trainer's MLflowCallback charts it by, ranking the checkpoints as metric_for_best_model does.
    assert "eval_acc_top1_" in mlflow.get_run(run_id).data.metrics
    assert all("eval_acc_top1_" in c.metrics for c in saved)
    tags = mlflow.get_run(run_id).data.tags
    assert (tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == ("eval_acc_top1_", "max")
    best = tracking.find_checkpoint(run_id, "best")
    assert f"checkpoint-{best.manifest.step}" == Path(str(trainer.state.best_model_checkpoint)).name


def test_the_core_never_imports_transformers() -> None:
    code = (
        "import sys, tracking, tracking.loader, tracking.pretrained, tracking.downloader; "
        "print(sorted({'transformers', 'lightning', 'tracking.integrations'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_resumed_training_mirrors_the_folder_materialised_from_the_run(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "first", [StopAfter(2), TrackingCallback()], epochs=3).train()
    run_id = run.info.run_id
    elsewhere = tmp_path / "elsewhere"
    folder = checkpoint_folder(run_id, output_dir=elsewhere)
    resumed = make_trainer(split, elsewhere, [TrackingCallback(run_id=run_id)], epochs=3, save_total_limit=1)
    resumed.train(resume_from_checkpoint=folder)
    # The Trainer rotated out the folder it resumed from: epoch 2's logged model went with it. Epoch 1,
    # whose folder this machine never had, is not the rotation's to delete.
    assert not Path(folder).exists()
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 3]


# -- save_strategy="steps": each save keyed by its global step -------------------------------------------------
# 256 rows in batches of 32: 8 steps an epoch, 24 in 3 epochs. A save every 5 steps lands mid-epoch (5, 10, 15,
# 20) and the Trainer saves the last step (24) too.


def test_save_strategy_steps_logs_each_save_keyed_by_its_global_step(
    s3_experiment: str, split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.get_experiment_by_name("unit-s3").experiment_id)
    out = tmp_path / "out"
    trainer = make_trainer(split, out, [TrackingCallback()], report_to="mlflow", **by_steps(5))
    trainer.train()
    run_id = mlflow.search_runs(output_format="list")[0].info.run_id
    found = tracking.list_checkpoints(run_id)
    assert [c.step for c in found] == [5, 10, 15, 20, 24]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(f"checkpoint-{c.step}" for c in found)
    # The epochs completed at each save, as the Trainer counts them when it resumes from that folder.
    assert [c.epoch for c in found] == [0, 1, 1, 2, 3]
    assert [(c.keyed_by, c.key) for c in found] == [("step", c.step) for c in found]
    assert [c.manifest.keyed_by for c in found] == ["step"] * 5
    client = mlflow.MlflowClient()
    for checkpoint in found:
        folder = out / f"checkpoint-{checkpoint.step}"
        assert client.get_logged_model(str(checkpoint.model_id)).name == layout.checkpoint_name(
            checkpoint.step, layout.STEP
        )
        assert set(checkpoint.manifest.files) == {p.name for p in folder.iterdir()} >= FILES
        for name, stored in checkpoint.manifest.files.items():
            assert (stored.size, stored.sha256) == ((folder / name).stat().st_size, sha256(folder / name))
        logged = {e["step"]: e for e in trainer.state.log_history if "eval_loss" in e}[checkpoint.step]
        assert checkpoint.metrics["eval_loss"] == logged["eval_loss"]
        # Charted at the global step, where the Trainer's own MLflow logging puts the same keys.
        model_steps = {m.key: m.step for m in client.get_logged_model(str(checkpoint.model_id)).metrics}
        assert model_steps["eval_loss"] == checkpoint.step, model_steps
    assert {m.step for m in client.get_metric_history(run_id, "eval_loss")} == {5, 10, 15, 20, 24}
    tags = mlflow.get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST] == found[-1].model_id and tags[layout.TAG_LATEST_STEP] == "24"
    assert "step 24" in tags["mlflow.note.content"] and "checkpoint_folder" in tags["mlflow.note.content"]
    # tracking.load and the selectors: an int is a global step in a run keyed by step.
    expected = weights(trainer.model)
    loaded = tracking.load(run_id)
    assert isinstance(loaded.model, DigitsClassifier) and (loaded.epoch, loaded.step) == (3, 24)
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)
    assert tracking.load(run_id, 10).step == 10
    native = DigitsClassifier.from_pretrained(checkpoint_folder(run_id, 15, output_dir=tmp_path / "native"))
    assert all(torch.equal(native.state_dict()[k], v) for k, v in tracking.load(run_id, 15).model.state_dict().items())


def test_save_strategy_steps_mirrors_save_total_limit_and_the_best_checkpoint(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with mlflow.start_run() as run:
        trainer = make_trainer(
            split,
            out,
            [Scores([0.1, 0.2, 0.3, 0.9, 0.5]), TrackingCallback()],
            save_total_limit=2,
            metric_for_best_model="score",
            greater_is_better=True,
            load_best_model_at_end=True,
            **by_steps(5),
        )
        trainer.train()
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == [20, 24]  # the Trainer kept the best (step 20) and the last
    run_id = run.info.run_id
    found = {c.key: c for c in tracking.list_checkpoints(run_id)}
    assert sorted(found) == [20, 24]
    tags = mlflow.get_run(run_id).data.tags
    assert tags[layout.TAG_BEST] == found[20].model_id and tags[layout.TAG_LATEST] == found[24].model_id
    assert (tags[layout.TAG_MONITOR], tags[layout.TAG_MODE]) == ("eval_score", "max")
    assert tracking.find_checkpoint(run_id, "best").manifest.step == 20
    assert Path(checkpoint_folder(run_id, "best", output_dir=tmp_path / "best")) == tmp_path / "best" / "checkpoint-20"
    # No logged model left behind for the steps the Trainer rotated out, steps 10 and 15 of one epoch among them.
    models = mlflow.MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == [layout.checkpoint_name(k, layout.STEP) for k in (20, 24)]


def test_save_strategy_steps_resumes_mid_epoch_from_a_run_id_as_the_straight_run(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    settings = {**by_steps(5), "logging_steps": 1}  # every step's loss: the whole curve is compared
    straight = make_trainer(split, tmp_path / "straight", [], **settings)
    straight.train()
    with mlflow.start_run() as run:
        # Killed at step 12: its last save is step 10, two steps into the second epoch.
        make_trainer(split, tmp_path / "first", [StopAtStep(12), TrackingCallback()], **settings).train()
    run_id = run.info.run_id
    assert [c.step for c in tracking.list_checkpoints(run_id)] == [5, 10]
    elsewhere = tmp_path / "elsewhere"
    assert Path(checkpoint_folder(run_id, 5, output_dir=tmp_path / "five")) == tmp_path / "five" / "checkpoint-5"
    folder = checkpoint_folder(run_id, output_dir=elsewhere)
    assert Path(folder) == elsewhere / "checkpoint-10"
    resumed = make_trainer(split, elsewhere, [TrackingCallback(run_id=run_id)], **settings)
    resumed.train(resume_from_checkpoint=folder)
    assert len(losses(straight)) == 24 and losses(resumed) == losses(straight)
    final, expected = weights(resumed.model), weights(straight.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    found = tracking.list_checkpoints(run_id)
    assert [(c.step, c.epoch) for c in found] == [(5, 0), (10, 1), (15, 1), (20, 2), (24, 3)]
    loaded = tracking.load(run_id)
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)


def test_a_run_keyed_by_epoch_is_not_continued_by_steps(s3_experiment: str, split: data.Split, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "first", [TrackingCallback()], epochs=1).train()
    run_id = run.info.run_id
    trainer = make_trainer(split, tmp_path / "second", [TrackingCallback(run_id=run_id)], **by_steps(5))
    with pytest.raises(TrackingError, match=f"run {run_id}") as refused:
        trainer.train()
    message = str(refused.value)
    assert "keyed by epoch" in message and "new run" in message and "\n" not in message
    assert trainer.state.global_step == 0
    assert [(c.keyed_by, c.epoch) for c in tracking.list_checkpoints(run_id)] == [("epoch", 1)]


def test_a_resumed_training_by_steps_mirrors_the_folder_materialised_from_the_run(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "first", [StopAtStep(12), TrackingCallback()], **by_steps(5)).train()
    run_id = run.info.run_id
    elsewhere = tmp_path / "elsewhere"
    folder = checkpoint_folder(run_id, output_dir=elsewhere)
    resumed = make_trainer(split, elsewhere, [TrackingCallback(run_id=run_id)], save_total_limit=1, **by_steps(5))
    resumed.train(resume_from_checkpoint=folder)
    # Step 10's folder, materialised from the run, was rotated out with its logged model; step 5's never was here.
    assert not Path(folder).exists()
    assert [c.step for c in tracking.list_checkpoints(run_id)] == [5, 24]


def test_a_save_by_epoch_after_training_stopped_mid_epoch_is_keyed_by_that_epoch(
    s3_experiment: str, split: data.Split, tmp_path: Path
) -> None:
    # max_steps=10 stops two steps into the second epoch (8 steps an epoch); the Trainer saves there too.
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "out", [TrackingCallback()], max_steps=10).train()
    found = tracking.list_checkpoints(run.info.run_id)
    # Epoch 1's checkpoint stays: the save of the unfinished second epoch does not replace it.
    assert [(c.key, c.step) for c in found] == [(1, 8), (2, 10)]
    assert tracking.load(run.info.run_id, 1).step == 8


# -- metric_for_best_model and where the Trainer evaluates ------------------------------------------------------
# One epoch of 8 steps. A save carries the eval metrics of an evaluation made at its step before it.
UNEVALUATED = {  # the schedules and whether the warning says the run will have no best checkpoint
    "epoch evals, step saves": ({"eval_strategy": "epoch", "save_strategy": "steps", "save_steps": 4}, True),
    "no evals": ({"eval_strategy": "no"}, True),
    "step evals off the saves": (
        {"eval_strategy": "steps", "eval_steps": 3, "save_strategy": "steps", "save_steps": 4},
        False,
    ),
    "step evals, epoch saves": ({"eval_strategy": "steps", "eval_steps": 3}, False),
}
EVALUATED = {
    "epoch evals, epoch saves": {},
    "step saves on evals": {"eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 4},
}


def unevaluated_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = [r for r in caplog.records if r.name == hf_callback.__name__]
    return [r.getMessage() for r in records if "Evaluate where you save" in r.getMessage()]


# One case of each in make test; the others in make test-all (slow).
@pytest.mark.parametrize(
    "schedule",
    [
        "epoch evals, step saves",
        *(pytest.param(schedule, marks=pytest.mark.slow) for schedule in sorted(UNEVALUATED)[1:]),
    ],
)
def test_a_metric_for_best_model_the_saves_cannot_carry_is_warned_of_once_as_training_starts(
    s3_experiment: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture, schedule: str
) -> None:
    settings, no_best = UNEVALUATED[schedule]
    with caplog.at_level(logging.WARNING, logger=hf_callback.__name__), mlflow.start_run() as run:
        make_trainer(
            split, tmp_path / "out", [TrackingCallback()], epochs=1, metric_for_best_model="loss", **settings
        ).train()
    [warned] = unevaluated_warnings(caplog)
    assert warned.startswith(f"run {run.info.run_id}: metric_for_best_model='loss' ranks its checkpoints by eval_loss")
    assert "eval_strategy equal to save_strategy and, by steps, save_steps a multiple of eval_steps" in warned
    assert "load_best_model_at_end" in warned and "\n" not in warned
    if no_best:
        # As the warning says: no checkpoint holds eval_loss, and the run has no best.
        assert "no best checkpoint" in warned
        found = tracking.list_checkpoints(run.info.run_id)
        assert found and not any("eval_loss" in c.metrics for c in found)
        assert layout.TAG_BEST not in mlflow.get_run(run.info.run_id).data.tags
    else:
        assert "every 3 steps" in warned and "only the saves that fall on an evaluation" in warned


@pytest.mark.parametrize(
    "schedule",
    [
        "step saves on evals",
        pytest.param("epoch evals, epoch saves", marks=pytest.mark.slow),
        pytest.param("no metric", marks=pytest.mark.slow),
    ],
)
def test_no_warning_when_each_save_falls_on_an_evaluation_or_no_metric_ranks_them(
    s3_experiment: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture, schedule: str
) -> None:
    if schedule == "no metric":
        settings = UNEVALUATED["epoch evals, step saves"][0]
    else:
        settings = {"metric_for_best_model": "loss", **EVALUATED[schedule]}
    with caplog.at_level(logging.WARNING, logger=hf_callback.__name__), mlflow.start_run() as run:
        make_trainer(split, tmp_path / "out", [TrackingCallback()], epochs=1, **settings).train()
    assert unevaluated_warnings(caplog) == []
    if schedule != "no metric":
        assert "eval_loss" in tracking.find_checkpoint(run.info.run_id, "best").manifest.metrics


def stored(run_id: str) -> tuple[dict[str | None, object], str]:
    """What a refused training must leave as it was: the run's checkpoints and its latest."""
    checkpoints = {c.model_id: c.key for c in tracking.list_checkpoints(run_id)}
    return checkpoints, mlflow.MlflowClient().get_run(run_id).data.tags[layout.TAG_LATEST]


def test_a_training_resumed_from_before_the_runs_latest_in_the_same_run_is_refused_before_it_trains(
    trained: tuple[str, Trainer], split: data.Split, tmp_path: Path
) -> None:
    run_id, _ = trained
    before = stored(run_id)
    folder = checkpoint_folder(run_id, 1, output_dir=tmp_path / "again")
    again = make_trainer(split, tmp_path / "again", [TrackingCallback(run_id=run_id)])
    with pytest.raises(TrackingError, match=f"run {run_id}") as refused:
        again.train(resume_from_checkpoint=folder)
    message = str(refused.value)
    assert "epoch 1" in message and "epochs 2, 3" in message and "\n" not in message
    assert "new MLflow run" in message and "checkpoint_folder" in message
    assert not any(entry.get("loss") for entry in again.state.log_history[len(before[0]) :])
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["checkpoint-8"]  # nothing saved
    assert stored(run_id) == before  # nothing deleted, the latest unmoved
    # Into a new run, the same checkpoint goes on as ever.
    with mlflow.start_run() as child:
        make_trainer(split, tmp_path / "child", [TrackingCallback()]).train(resume_from_checkpoint=folder)
    assert [c.epoch for c in tracking.list_checkpoints(child.info.run_id)] == [2, 3]


def test_a_fresh_training_into_a_run_with_its_checkpoints_is_refused_before_it_trains(
    trained: tuple[str, Trainer], split: data.Split, tmp_path: Path
) -> None:
    run_id, _ = trained
    before = stored(run_id)
    again = make_trainer(split, tmp_path / "again", [TrackingCallback(run_id=run_id)])
    with pytest.raises(TrackingError, match=f"run {run_id}: this training starts afresh") as refused:
        again.train()  # no resume_from_checkpoint
    message = str(refused.value)
    assert "epochs 1, 2, 3; latest epoch 3" in message and "\n" not in message
    assert "new MLflow run" in message and f'checkpoint_folder("{run_id}"' in message
    assert again.state.global_step == 0 and not list((tmp_path / "again").glob("checkpoint-*"))  # nothing saved
    assert stored(run_id) == before  # nothing deleted, the latest unmoved


def test_a_resume_from_a_save_only_model_checkpoint_warns_that_it_starts_a_fresh_optimizer(
    s3_experiment: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        make_trainer(
            split, tmp_path / "first", [StopAfter(1), TrackingCallback()], epochs=2, save_only_model=True
        ).train()
    run_id = run.info.run_id
    folder = checkpoint_folder(run_id, output_dir=tmp_path / "again")
    resumed = make_trainer(split, tmp_path / "again", [TrackingCallback(run_id=run_id)], epochs=2, save_only_model=True)
    with caplog.at_level(logging.WARNING, logger=hf_callback.__name__):
        resumed.train(resume_from_checkpoint=folder)
    (warning,) = [r.getMessage() for r in caplog.records if "save_only_model" in r.getMessage()]
    assert run_id in warning and "optimizer" in warning and "LR schedule" in warning and "RNG" in warning
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2]


def test_the_save_only_model_warning_looks_at_the_folder_the_trainer_resumes_from(
    s3_experiment: str, split: data.Split, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The Trainer resumes from the folder given to train(), wherever it is: not from output_dir's folder of that
    # step, which may be missing, or another save of the same step.
    def first(name: str, **settings: Any) -> tuple[str, Path]:
        with mlflow.start_run() as run:
            make_trainer(split, tmp_path / name, [StopAfter(1), TrackingCallback()], epochs=2, **settings).train()
        return run.info.run_id, tmp_path / name / "checkpoint-8"

    def warned(run_id: str, resumed_from: Path, output_dir: Path) -> list[str]:
        caplog.clear()
        resumed = make_trainer(split, output_dir, [TrackingCallback(run_id=run_id)], epochs=2)
        with caplog.at_level(logging.WARNING, logger=hf_callback.__name__):
            resumed.train(resume_from_checkpoint=str(resumed_from))
        return [r.getMessage() for r in caplog.records if "save_only_model" in r.getMessage()]

    model_only, model_only_folder = first("model-only", save_only_model=True)
    (warning,) = warned(model_only, model_only_folder, tmp_path / "elsewhere")
    assert model_only in warning and str(model_only_folder) in warning
    # A full folder resumed while output_dir holds a model-only save of the same step: nothing to warn of.
    full, full_folder = first("full")
    shutil.copytree(model_only_folder, tmp_path / "shared" / "checkpoint-8")
    assert warned(full, full_folder, tmp_path / "shared") == []
