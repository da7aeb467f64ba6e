"""Promise: "No torn checkpoint is ever loaded: ... ``kill -9`` at any phase of a save leave the previous
checkpoint loadable and the pointers right" (and "Re-logging must not destroy the old one before the
new one is committed").

Child processes save to the real stack and SIGKILL themselves at one phase each (see
tests/reliability/crash.py): after creating the multipart upload, before part 2, after
completing it, after the manifest, after moving the tags, between the two deletes of
retention, between the data and the manifest of a re-logged epoch, and a training pipeline
mid-save. The children run side by side; then, for each, the parent checks: the previous
checkpoint loads exactly as saved, latest and best name committed checkpoints, verify finds
every committed file intact and lists the leftovers, and once they are cleaned
(``tracking.audit.clean_leftovers`` where it exists) nothing of the dead save is left in the bucket.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tracking
from tests.reliability import invariants, workload
from tracking import audit, layout
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
CHILDREN_LIMIT_S = 300.0


def _data(epoch: int) -> str:
    return rf"{layout.checkpoint_dir(epoch)}/(?!{layout.MANIFEST_FILE})"


def _manifest(epoch: int) -> str:
    return re.escape(layout.manifest_path(layout.checkpoint_dir(epoch)))


@dataclass(frozen=True)
class Crash:
    """A child that saves ``epochs`` to a run holding epoch 1, and is killed at one call."""

    when: str
    op: str
    key: str = ""
    nth: int = 1
    epochs: str = "2"
    latest: frozenset[int] = frozenset({1})  # where latest may point after the crash
    previous: int | None = 1  # a checkpoint that must still load, exactly as first saved
    relog: bool = False  # the child re-logs epoch 1 with other weights
    child_args: tuple[str, ...] = field(default=())


CRASHES: dict[str, Crash] = {
    "after-create-upload": Crash("after", "CreateMultipartUpload", _data(2)),
    "before-part-2": Crash("before", "UploadPart", _data(2), nth=2),
    "after-complete-upload": Crash("after", "CompleteMultipartUpload", _data(2)),
    "after-manifest": Crash("after", "PutObject", _manifest(2), latest=frozenset({1, 2})),
    "after-tags": Crash("after", "tags", latest=frozenset({2})),
    "retention-between-deletes": Crash(
        "after", "DeleteObject", _manifest(1), latest=frozenset({2}), previous=None, child_args=("--keep-last", "1")
    ),
    "relog-after-complete-upload": Crash("after", "CompleteMultipartUpload", _data(1), epochs="1", relog=True),
}
PIPELINE = "pipeline-after-data-of-epoch-3"


@dataclass
class Child:
    run_id: str
    returncode: int | None
    output: str


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.crash", *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def crashed(stack_postgres: LocalStack) -> Iterator[dict[str, Child]]:
    """Every crash of this module, run side by side once: name -> the child's run and exit."""
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow import MlflowClient

    from tracking.storage import s3 as s3_storage

    with pytest.MonkeyPatch.context() as patch:
        for key, value in stack_postgres.env().items():
            patch.setenv(key, value)
        patch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
        experiment = f"reliability-crash-{uuid.uuid4().hex[:8]}"
        patch.setenv("TRACKING_EXPERIMENT", experiment)
        patch.setattr(tracking_utils, "_tracking_uri", stack_postgres.tracking_uri)
        s3_storage.s3_client.cache_clear()
        client = MlflowClient(stack_postgres.tracking_uri)
        experiment_id = client.create_experiment(experiment)
        procs: dict[str, tuple[str, subprocess.Popen[str]]] = {}
        try:
            for name, crash in CRASHES.items():
                run_id = str(client.create_run(experiment_id).info.run_id)
                workload.log(run_id, 1, hidden=workload.BIG if crash.relog else workload.SMALL)
                kill = ["--when", crash.when, "--op", crash.op, "--key", crash.key, "--nth", str(crash.nth)]
                child = ["tests.reliability.workload", run_id, "--epochs", crash.epochs, *crash.child_args]
                if crash.relog:
                    child += ["--salt", "1"]
                procs[name] = (run_id, _spawn(kill + child))
            pipeline = ["--when", "after", "--op", "PutObject", "--key", _data(3), "pipelines.train"]
            pipeline += ["--epochs", "4", "--checkpoint-every", "1", "--keep-last", "2", "--keep-best", "1"]
            procs[PIPELINE] = ("", _spawn(pipeline))
            results: dict[str, Child] = {}
            deadline = time.monotonic() + CHILDREN_LIMIT_S
            for name, (run_id, proc) in procs.items():
                try:
                    output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    output, _ = proc.communicate()
                    output += f"\n(killed by the test after {CHILDREN_LIMIT_S:.0f}s)"
                if name == PIPELINE:
                    found = re.search(r"MLflow run ([0-9a-f]{32})", output)
                    run_id = found.group(1) if found else ""
                results[name] = Child(run_id, proc.returncode, output)
        finally:
            for _, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        yield results


def _clean_and_check(stack: LocalStack, run_id: str, expected: invariants.Expected | None) -> None:
    """What the dead save left: invisible to verify's checks and the loader, listed by verify as
    leftovers, and gone after ``clean_leftovers`` (where the library has it)."""
    left = invariants.leftovers(stack, run_id)
    committed = set(invariants.committed(run_id))
    report = audit.verify(run_id)
    for path in report:
        epoch = layout.epoch_of(path)
        assert epoch is None or epoch in committed, f"verify checks uncommitted {path} as if committed: {report}"
    if hasattr(report, "leftovers"):
        reported = {leftover.path for leftover in report.leftovers}
        assert set(left) <= reported, f"verify does not report leftovers {sorted(set(left) - reported)}"
    clean = getattr(audit, "clean_leftovers", None)
    if clean is None:
        return
    clean(run_id)
    remaining = invariants.leftovers(stack, run_id)
    assert not remaining, f"after clean_leftovers({run_id!r}) the dead save's leftovers remain: {remaining}"
    invariants.assert_sound(run_id, expected)


def _assert_killed(child: Child, name: str) -> None:
    assert child.returncode == -signal.SIGKILL, (
        f"the child never died at {name} (exit status {child.returncode}); its output ends:\n{child.output[-3000:]}"
    )


@pytest.mark.parametrize("name", list(CRASHES))
def test_kill_during_save(name: str, crashed: dict[str, Child], stack: LocalStack) -> None:
    crash = CRASHES[name]
    child = crashed[name]
    _assert_killed(child, name)
    first = workload.BIG if crash.relog else workload.SMALL
    expected: dict[int, list[Any]] = {1: [workload.model_state(1, first)], 2: [workload.model_state(2)]}
    if crash.relog:
        expected[1].append(workload.model_state(1, workload.BIG, salt=1))

    epochs = invariants.assert_sound(child.run_id, expected)

    if crash.previous is not None:
        assert crash.previous in epochs, f"killed {name}: the previous checkpoint (epoch 1) is gone: {epochs}"
    latest = invariants.epoch_of_tag(invariants.run_tags(child.run_id), layout.TAG_LATEST)
    assert latest in crash.latest, f"killed {name}: latest is epoch {latest}, expected one of {set(crash.latest)}"
    _clean_and_check(stack, child.run_id, expected)


def test_killed_training_resumes_from_the_previous_checkpoint(crashed: dict[str, Child], stack: LocalStack) -> None:
    child = crashed[PIPELINE]
    _assert_killed(child, PIPELINE)
    assert child.run_id, f"the pipeline printed no run ID:\n{child.output[-3000:]}"
    assert invariants.assert_sound(child.run_id, None)[-1] == 2
    assert invariants.epoch_of_tag(invariants.run_tags(child.run_id), layout.TAG_LATEST) == 2
    _clean_and_check(stack, child.run_id, None)

    resumed = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--resume", child.run_id, "--epochs", "4"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = invariants.assert_sound(child.run_id, None)
    assert epochs[-1] == 4 and tracking.load(child.run_id).epoch == 4
    assert invariants.leftovers(stack, child.run_id) == []
