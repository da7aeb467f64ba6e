"""The Hugging Face Trainer under DDP (2 gloo ranks on CPU, under torchrun) with TrackingCallback, on the real
stack: each logged checkpoint holds every rank's RNG state, a resume by run ID on 2 ranks repeats the straight
run bit for bit (from an epoch's end, and from mid-epoch with saves by steps), and a failed upload makes every
rank raise rather than wait in a collective."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from tracking.audit import verify
from tracking.localstack import LocalStack

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
RNG_FILES = {"rng_state_0.pth", "rng_state_1.pth"}


def _launch(stack: LocalStack, run_id: str, output_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "tests.distributed.hf_ddp"]
    command += [run_id, str(output_dir), str(output_dir / "final.pt"), *args]
    env = {**os.environ, **stack.env()}
    # Bounded: a rank left waiting in a collective fails the test instead of hanging it.
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _new_run(stack: LocalStack) -> str:
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("hf-ddp")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("hf-ddp")
    return str(client.create_run(experiment_id).info.run_id)


@pytest.fixture(scope="module")
def tracked(stack_sqlite: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A run trained 4 epochs on 2 ranks, every epoch logged: its ID and the Trainer's output_dir.

    Each rank writes to a disk of its own, as on two machines: rank 0's checkpoint folders never see
    rank 1's RNG file.
    """
    output_dir = tmp_path_factory.mktemp("hf-ddp") / "straight"
    run_id = _new_run(stack_sqlite)
    done = _launch(stack_sqlite, run_id, output_dir, "--machine-per-rank")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "rank 0: done" in done.stdout and "rank 1: done" in done.stdout
    return run_id, output_dir


@pytest.fixture(autouse=True)
def _client_env(stack_sqlite: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in stack_sqlite.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", stack_sqlite.tracking_uri)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_checkpoint_holds_every_ranks_rng_state(tracked: tuple[str, Path], tmp_path: Path) -> None:
    run_id, output_dir = tracked
    saved = tracking.list_checkpoints(run_id)
    assert [c.epoch for c in saved] == [1, 2, 3, 4]
    for checkpoint in saved:
        step = checkpoint.manifest.step
        assert set(checkpoint.manifest.files) >= RNG_FILES, (checkpoint.epoch, sorted(checkpoint.manifest.files))
        # Downloading checks every file against its sha256; each rank's file is the one that rank wrote.
        folder = tracking.download(run_id, checkpoint.epoch, to=tmp_path / f"epoch-{checkpoint.epoch}")
        for rank in (0, 1):
            name = f"rng_state_{rank}.pth"
            written = output_dir / f"rank-{rank}" / f"checkpoint-{step}" / name
            assert _sha256(folder / name) == _sha256(written), name
    assert verify(run_id).failures == {}


def _final(state_file: Path) -> dict[str, Any]:
    return dict(torch.load(state_file, weights_only=True))


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, torch.Tensor):
        return isinstance(right, torch.Tensor) and torch.equal(left, right)
    if isinstance(left, dict):
        return isinstance(right, dict) and left.keys() == right.keys() and all(_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(_equal(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)


@pytest.mark.parametrize(
    ("machines", "downloads"),
    [([], 1), (["--machine-per-rank"], 2)],
    ids=["one-machine", "a-machine-per-rank"],
)
def test_resume_by_run_id_on_two_ranks_repeats_the_straight_run(
    stack_sqlite: LocalStack, tracked: tuple[str, Path], tmp_path: Path, machines: list[str], downloads: int
) -> None:
    run_id, straight = tracked
    # Elsewhere, from the run ID alone, as a job killed after epoch 2 resumes: every rank asks for the folder.
    # Into a run of its own: the straight run has epochs 3 and 4 already, which a resume in it may not rewrite.
    resumed, resumed_run = tmp_path / "resumed", _new_run(stack_sqlite)
    done = _launch(stack_sqlite, resumed_run, resumed, "--resume", "2", "--from", run_id, *machines)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    # One download per disk: the ranks of a machine share one.
    assert done.stdout.count(": downloaded") == downloads, done.stdout
    expected, found = _final(straight / "final.pt"), _final(resumed / "final.pt")
    assert found["losses"] == expected["losses"]
    assert _equal(found["model"], expected["model"])
    assert _equal(found["optimizer"], expected["optimizer"])
    # The resumed training logged the epochs it trained into its run.
    assert [c.epoch for c in tracking.list_checkpoints(resumed_run)] == [3, 4]


def test_saves_by_steps_hold_every_ranks_rng_state_and_resume_mid_epoch_on_two_ranks(
    stack_sqlite: LocalStack, tmp_path: Path
) -> None:
    # 4 steps an epoch on each rank, a save every 3 steps: steps 3, 6, 9, 12, 15 and the last, 16.
    run_id, straight = _new_run(stack_sqlite), tmp_path / "straight"
    done = _launch(stack_sqlite, run_id, straight, "--steps", "3", "--machine-per-rank")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    saved = tracking.list_checkpoints(run_id)
    assert [(c.keyed_by, c.key, c.epoch) for c in saved] == [
        ("step", 3, 0),
        ("step", 6, 1),
        ("step", 9, 2),
        ("step", 12, 3),
        ("step", 15, 3),
        ("step", 16, 4),
    ]
    assert all(set(c.manifest.files) >= RNG_FILES for c in saved)
    # Killed in epoch 2 after step 6 (its second of four): resumed by run ID from that step's checkpoint, into a
    # run of its own (the straight run holds the later steps).
    resumed, resumed_run = tmp_path / "resumed", _new_run(stack_sqlite)
    args = ["--steps", "3", "--resume", "6", "--from", run_id, "--machine-per-rank"]
    done = _launch(stack_sqlite, resumed_run, resumed, *args)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    expected, found = _final(straight / "final.pt"), _final(resumed / "final.pt")
    assert len(found["losses"]) == 16 and found["losses"] == expected["losses"]
    assert _equal(found["model"], expected["model"])
    assert _equal(found["optimizer"], expected["optimizer"])
    assert [c.key for c in tracking.list_checkpoints(resumed_run)] == [9, 12, 15, 16]


def test_a_failed_upload_raises_on_every_rank(stack_sqlite: LocalStack, tmp_path: Path) -> None:
    run_id = _new_run(stack_sqlite)
    done = _launch(stack_sqlite, run_id, tmp_path / "out", "--fail")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    for rank in (0, 1):
        assert f"rank {rank}: raised StorageError: the store refused the upload" in output, output[-4000:]
    assert tracking.list_checkpoints(run_id) == []
