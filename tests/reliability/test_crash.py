"""Promise: "No torn checkpoint is ever loaded: ... ``kill -9`` at any phase of a save leave the previous
checkpoint loadable and the pointers right" (and "Re-logging must not destroy the old one before the
new one is committed").

Child processes save to the real stack and SIGKILL themselves at one phase each (see
tests/reliability/crash.py): after creating the checkpoint's logged model, after creating the
multipart upload, before part 2, after completing it, after the manifest (not yet READY), after
READY (tags not yet moved), after moving the tags; between retention's deletes (manifest gone,
files not; files gone, logged model not); in a re-log of epoch 1 after its data, its manifest,
READY and the tags; and a training pipeline mid-save. The children run side by side; then, for
each, the parent checks: the previous checkpoint loads exactly as saved (a re-log: the old or the
new weights, as far as the save got), exactly the expected epochs are committed, latest and best
name committed checkpoints, verify finds every committed file intact and lists the leftovers
(uncommitted logged models, stray files, unfinished uploads), and once ``clean_leftovers`` ran
nothing of the dead save is left in the bucket or among the run's logged models.
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
from tests.reliability.crash import CREATE_MODEL, DELETE_MODEL, FINALIZE_MODEL
from tracking import audit, layout
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
CHILDREN_LIMIT_S = 300.0


# Object keys name no epoch (``.../models/m-<hex>/artifacts/checkpoint.pt``): a kill point is the
# Nth matching request of the child, whose saves are the only ones it makes.
DATA = rf"/{re.escape(layout.CHECKPOINT_FILE)}$"
MANIFEST = rf"/{re.escape(layout.MANIFEST_FILE)}$"


@dataclass(frozen=True)
class Crash:
    """A child that saves ``epochs`` to a run holding epoch 1, and is killed at one call."""

    when: str
    op: str
    key: str = ""
    nth: int = 1
    epochs: str = "2"
    latest: frozenset[int] = frozenset({1})  # where latest may point after the crash
    committed: frozenset[int] = frozenset({1})  # the committed epochs after the crash
    previous: int | None = 1  # a checkpoint that must still load, exactly as first saved
    relog: bool = False  # the child re-logs epoch 1 with other weights
    relogged: bool = False  # whether epoch 1 then loads the re-logged weights (else the old ones)
    leaves: bool = True  # whether the dead save leaves something for verify to report
    child_args: tuple[str, ...] = field(default=())


NEW = frozenset({1, 2})
RETAINED = frozenset({2})
KEEP_LAST_1 = ("--keep-last", "1")
CRASHES: dict[str, Crash] = {
    # A save: logged model (PENDING), checkpoint.pt (multipart), manifest.json, READY, then the tags.
    "after-create-model": Crash("after", "mlflow", CREATE_MODEL),
    "after-create-upload": Crash("after", "CreateMultipartUpload", DATA),
    "before-part-2": Crash("before", "UploadPart", DATA, nth=2),
    "after-complete-upload": Crash("after", "CompleteMultipartUpload", DATA),
    "after-manifest": Crash("after", "PutObject", MANIFEST),
    "after-ready": Crash("after", "mlflow", FINALIZE_MODEL, committed=NEW, leaves=False),
    "after-tags": Crash("after", "tags", latest=RETAINED, committed=NEW, leaves=False),
    # Retention (keep the last 1) deletes epoch 1: manifest, then files, then the logged model.
    "retention-between-deletes": Crash(
        "after", "DeleteObject", MANIFEST, latest=RETAINED, committed=RETAINED, previous=None, child_args=KEEP_LAST_1
    ),
    "retention-before-model-delete": Crash(
        "before",
        "mlflow",
        DELETE_MODEL,
        latest=RETAINED,
        committed=RETAINED,
        previous=None,
        child_args=KEEP_LAST_1,
    ),
    # A re-log of epoch 1 makes a new logged model; the old one goes only after the tags name the new one.
    "relog-after-complete-upload": Crash("after", "CompleteMultipartUpload", DATA, epochs="1", relog=True),
    "relog-after-manifest": Crash("after", "PutObject", MANIFEST, epochs="1", relog=True),
    "relog-after-ready": Crash("after", "mlflow", FINALIZE_MODEL, epochs="1", relog=True),
    "relog-after-tags": Crash("after", "tags", epochs="1", relog=True, relogged=True),
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

    from tracking.storage.s3_client import s3_client

    with pytest.MonkeyPatch.context() as patch:
        for key, value in stack_postgres.env().items():
            patch.setenv(key, value)
        patch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
        experiment = f"reliability-crash-{uuid.uuid4().hex[:8]}"
        patch.setenv("TRACKING_EXPERIMENT", experiment)
        patch.setattr(tracking_utils, "_tracking_uri", stack_postgres.tracking_uri)
        s3_client.cache_clear()
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
            # The pipeline's checkpoints are single PutObjects: its third checkpoint.pt is epoch 3's data.
            pipeline = ["--when", "after", "--op", "PutObject", "--key", DATA, "--nth", "3", "pipelines.train"]
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


def _clean_and_check(stack: LocalStack, run_id: str, expected: invariants.Expected | None, leaves: bool) -> None:
    """What the dead save left: invisible to verify's checks and the loader, listed by verify as
    leftovers, and gone (objects, uploads and uncommitted logged models) after ``clean_leftovers``."""
    left = invariants.leftovers(stack, run_id)
    assert bool(left) == leaves, f"the dead save should {'' if leaves else 'not '}leave leftovers: {left}"
    committed = {c.model_id for c in invariants.checkpoints(run_id).values()}
    report = audit.verify(run_id)
    for path in report:
        model = layout.MODEL_ID.search(path.split("/", 1)[0])
        assert model is None or model.group() in committed, (
            f"verify checks uncommitted {path} as if committed: {report}"
        )
    reported = {leftover.path for leftover in report.leftovers}
    missed = [path for path in left if not invariants.covered(path, reported)]
    assert not missed, f"verify does not report leftovers {missed} (it reports {sorted(reported)})"
    audit.clean_leftovers(run_id)
    remaining = invariants.leftovers(stack, run_id)
    assert not remaining, f"after clean_leftovers({run_id!r}) the dead save's leftovers remain: {remaining}"
    assert not audit.verify(run_id).leftovers, "verify still reports leftovers after clean_leftovers"
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

    assert set(epochs) == crash.committed, f"killed {name}: committed epochs {epochs}, expected {set(crash.committed)}"
    if crash.previous is not None:
        assert crash.previous in epochs, f"killed {name}: the previous checkpoint (epoch 1) is gone: {epochs}"
    latest = invariants.epoch_of_tag(invariants.run_tags(child.run_id), layout.TAG_LATEST)
    assert latest in crash.latest, f"killed {name}: latest is epoch {latest}, expected one of {set(crash.latest)}"
    if crash.relog:
        loaded = tracking.load(child.run_id, 1).model.state_dict()
        assert workload.same_state(loaded, expected[1][1 if crash.relogged else 0]), (
            f"killed {name}: epoch 1 loads the {'old' if crash.relogged else 're-logged'} weights"
        )
    _clean_and_check(stack, child.run_id, expected, crash.leaves)
    if crash.relog:
        loaded = tracking.load(child.run_id).model.state_dict()
        assert workload.same_state(loaded, expected[1][1 if crash.relogged else 0]), f"{name}: clean changed epoch 1"


def test_killed_training_resumes_from_the_previous_checkpoint(crashed: dict[str, Child], stack: LocalStack) -> None:
    child = crashed[PIPELINE]
    _assert_killed(child, PIPELINE)
    assert child.run_id, f"the pipeline printed no run ID:\n{child.output[-3000:]}"
    assert invariants.assert_sound(child.run_id, None)[-1] == 2
    assert invariants.epoch_of_tag(invariants.run_tags(child.run_id), layout.TAG_LATEST) == 2
    _clean_and_check(stack, child.run_id, None, leaves=True)

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
