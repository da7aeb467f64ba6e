"""Promise: "Concurrent writers never move latest backwards or best to a worse checkpoint" (with
retention on, every run keeps exactly its checkpoints and its pointers name them).

Four training processes share one MLflow server on PostgreSQL and one bucket, each in its own
run with retention (keep the last 2 and the best 1); and two writers log to the same run at
once, a fast one and a slow one whose save is held just before its manifest until the fast one
is done, so its pointer update lands last, holding tags it read long before.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tracking
from tests.reliability import invariants, workload
from tracking import layout
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
TRAININGS = 4
EPOCHS = 6
LIMIT_S = 300.0


def _finish(procs: list[subprocess.Popen[str]], limit_s: float) -> list[tuple[int | None, str]]:
    """Wait for every process (all together at most ``limit_s``); kill what is left."""
    deadline = time.monotonic() + limit_s
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n(killed by the test after {limit_s:.0f}s)"
        results.append((proc.returncode, output))
    return results


def _popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_concurrent_trainings_keep_exactly_their_checkpoints(stack: LocalStack) -> None:
    experiment = f"reliability-trainings-{uuid.uuid4().hex[:8]}"
    # Made here: four pipelines starting at once would race to create it (a pipelines issue, not this promise).
    MlflowClient().create_experiment(experiment)
    env = {**os.environ, "TRACKING_EXPERIMENT": experiment}
    argv = ["pipelines.train", "--epochs", str(EPOCHS), "--checkpoint-every", "1", "--keep-last", "2"]
    argv += ["--keep-best", "1"]
    # Learning rates from gentle to wild, so that in some runs the best epoch is not the last.
    procs = [_popen([*argv, "--lr", lr, "--seed", str(seed)], env) for seed, lr in enumerate(("0.1", "0.8", "3", "12"))]
    results = _finish(procs, LIMIT_S)

    client = MlflowClient()
    run_ids = []
    for returncode, output in results:
        assert returncode == 0, output[-3000:]
        found = re.search(r"MLflow run ([0-9a-f]{32})", output)
        assert found, output[-3000:]
        run_ids.append(found.group(1))
    assert len(set(run_ids)) == TRAININGS
    for run_id in run_ids:
        losses = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
        assert sorted(losses) == list(range(1, EPOCHS + 1)), losses
        best = min(losses, key=lambda epoch: (losses[epoch], epoch))
        expected_kept = sorted({EPOCHS - 1, EPOCHS, best})

        epochs = invariants.assert_sound(run_id, None)

        assert epochs == expected_kept, f"run {run_id}: kept {epochs}, expected {expected_kept} (val_loss {losses})"
        tags = invariants.run_tags(run_id)
        kept = invariants.checkpoints(run_id)
        assert tags[layout.TAG_LATEST] == kept[EPOCHS].model_id and tags[layout.TAG_LATEST_EPOCH] == str(EPOCHS)
        assert tags[layout.TAG_BEST] == kept[best].model_id, f"run {run_id}: val_loss {losses}, tags {tags}"
        # Retention deleted the other epochs' logged models and every object of theirs.
        assert invariants.leftovers(stack, run_id) == [], f"run {run_id}: retention left objects behind"
        assert sorted(m.model_id for m in invariants.run_models(run_id)) == sorted(c.model_id for c in kept.values())
        assert float(tags[layout.TAG_BEST_VALUE]) == pytest.approx(losses[best], rel=1e-12)
        assert tracking.load(run_id, "best").epoch == best
        assert client.get_run(run_id).info.status == "FINISHED"


def test_two_writers_on_one_run_never_move_pointers_backwards(
    stack: LocalStack, new_run: Callable[[], str], tmp_path: Path
) -> None:
    run_id = new_run()
    env = dict(os.environ)
    ready, fast_done = tmp_path / "slow-is-held", tmp_path / "fast-is-done"
    small = ["--hidden", str(workload.SMALL)]
    # The slow writer commits 1, 3, 5, 7, then reads the run's tags for epoch 9, uploads it, and is
    # held before its manifest until the fast writer has committed 2, 4, ..., 10 (best: 6).
    hold = ["--hold-before-manifest", "9", "--ready", str(ready), "--until", str(fast_done)]
    slow = _popen(["tests.reliability.workload", run_id, "--epochs", "1,3,5,7,9", *small, *hold], env)
    after = ["--wait-for", str(ready), "--touch", str(fast_done)]
    fast = _popen(["tests.reliability.workload", run_id, "--epochs", "2,4,6,8,10", *small, *after], env)
    client = MlflowClient()
    seen: list[int] = []
    named: dict[str, int] = {}  # each model ID latest named -> the epoch latest_epoch said with it
    deadline = time.monotonic() + LIMIT_S
    for _ in range(int(LIMIT_S / 0.1)):
        if (slow.poll() is not None and fast.poll() is not None) or time.monotonic() > deadline:
            break
        tags = client.get_run(run_id).data.tags
        latest = tags.get(layout.TAG_LATEST_EPOCH)
        if latest is not None and (not seen or seen[-1] != int(latest)):
            seen.append(int(latest))
            named[tags[layout.TAG_LATEST]] = int(latest)
        time.sleep(0.1)
    (slow_rc, slow_out), (fast_rc, fast_out) = _finish([slow, fast], max(1.0, deadline - time.monotonic()))
    assert slow_rc == 0, slow_out[-3000:]
    assert fast_rc == 0, fast_out[-3000:]
    seen.append(int(invariants.run_tags(run_id)[layout.TAG_LATEST_EPOCH]))

    expected = {epoch: [workload.model_state(epoch, workload.SMALL)] for epoch in range(1, 11)}
    epochs = invariants.assert_sound(run_id, expected)

    assert epochs == list(range(1, 11))
    assert seen == sorted(seen), f"latest moved backwards: it named epochs {seen} in turn"
    kept = invariants.checkpoints(run_id)
    by_id = {checkpoint.model_id: epoch for epoch, checkpoint in kept.items()}
    assert all(by_id.get(model_id) == epoch for model_id, epoch in named.items()), (
        f"latest and latest_epoch disagreed: {named}, committed {by_id}"
    )
    tags = invariants.run_tags(run_id)
    best = min(workload.VAL_LOSS, key=lambda epoch: workload.VAL_LOSS[epoch])
    assert tags[layout.TAG_LATEST] == kept[10].model_id, f"latest ended at {tags[layout.TAG_LATEST]}"
    assert tags[layout.TAG_BEST] == kept[best].model_id, (
        f"best ended at {tags[layout.TAG_BEST]} ({tags[layout.TAG_BEST_VALUE]}), not at epoch {best} "
        f"({workload.VAL_LOSS[best]})"
    )
    assert float(tags[layout.TAG_BEST_VALUE]) == workload.VAL_LOSS[best]
