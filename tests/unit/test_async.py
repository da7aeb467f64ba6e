"""Asynchronous saves: snapshot isolation, error propagation, ordering, coalescing, flush at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking import checkpoint, checkpointer
from tracking import saver as background_saves
from tracking.layout import TAG_LATEST
from tracking.saver import AsyncSaver, to_host

REPO = Path(__file__).resolve().parents[2]


def latest_tag(run_id: str) -> int:
    """The epoch of the checkpoint the run's latest tag names (a READY logged model of the run)."""
    client = MlflowClient()
    model = client.get_logged_model(client.get_run(run_id).data.tags[TAG_LATEST])
    assert (str(model.status), model.source_run_id) == ("READY", run_id)
    return int(model.params["epoch"])


def test_snapshot_is_taken_before_save_returns(experiment: str) -> None:
    model = Model(6)
    with torch.no_grad():
        model.linear.weight.fill_(1.0)
    with mlflow.start_run() as run:
        future = tracking.log_checkpoint(model, epoch=1, blocking=False)
        with torch.no_grad():
            model.linear.weight.fill_(2.0)  # the training loop goes on while the upload runs
        logged = future.result(timeout=60)
        assert (logged.path, logged.epoch) == ("checkpoint-epoch-0001", 1)
    weights = tracking.load_state_dict(run.info.run_id)["linear.weight"]
    assert torch.equal(weights, torch.ones_like(weights))


def test_to_host_copies_tensors_and_keeps_structure() -> None:
    tensor = torch.ones(3)
    state = {"a": [tensor, (tensor, 1)], "b": "x"}
    copied = to_host(state)
    tensor.add_(1)
    assert torch.equal(copied["a"][0], torch.ones(3)) and isinstance(copied["a"][1], tuple)
    assert copied["b"] == "x"


def test_background_error_is_raised_on_next_save_and_close(experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(6)
    saver = tracking.Checkpointer(async_save=True)
    real_commit = checkpoint.commit_checkpoint

    def commit(handle: Any, snapshot: Any, *args: Any, **kwargs: Any) -> Any:
        if snapshot.manifest.epoch == 2:
            raise tracking.StorageError("injected: the store went away")
        return real_commit(handle, snapshot, *args, **kwargs)

    monkeypatch.setattr(checkpointer, "commit_checkpoint", commit)
    with mlflow.start_run() as run:
        saver.save(model, epoch=1)
        saver.wait()
        failed = saver.save(model, epoch=2)
        assert failed is not None
        with pytest.raises(tracking.StorageError, match="injected"):
            saver.wait()
        # The error is reported once; the next save goes through.
        saver.save(model, epoch=3)
        saver.save(model, epoch=4)
        saver.close()
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1, 3, 4]
    assert latest_tag(run.info.run_id) == 4


def test_failed_background_save_leaves_previous_latest(experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        with monkeypatch.context() as patch:

            def explode(obj: object, stream: object) -> None:
                raise OSError("injected: crash during upload")

            patch.setattr(torch, "save", explode)
            future = tracking.log_checkpoint(model, epoch=2, blocking=False)
            with pytest.raises(tracking.StorageError, match="injected"):
                future.result(timeout=60)
            with pytest.raises(tracking.StorageError, match="injected"):
                tracking.wait_for_checkpoints()
    assert latest_tag(run.info.run_id) == 1
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1]


def test_saves_commit_in_submission_order_one_at_a_time() -> None:
    saver = AsyncSaver(on_busy="wait")
    order: list[int] = []
    running = threading.Semaphore(1)

    def job(n: int) -> int:
        assert running.acquire(blocking=False), "two saves ran at once"
        time.sleep(0.01)
        order.append(n)
        running.release()
        return n

    futures = [saver.submit(lambda n=n: job(n)) for n in range(8)]  # type: ignore[misc]
    saver.close()
    assert order == list(range(8))
    assert [f.result() for f in futures] == list(range(8))


def test_coalesce_drops_superseded_queued_saves() -> None:
    saver = AsyncSaver(on_busy="coalesce")
    gate, started = threading.Event(), threading.Event()
    order: list[int] = []

    def job(n: int) -> int:
        if n == 0:
            started.set()
            gate.wait(timeout=30)
        order.append(n)
        return n

    first = saver.submit(lambda: job(0))
    assert started.wait(timeout=30)
    queued = [saver.submit(lambda n=n: job(n)) for n in range(1, 5)]  # type: ignore[misc]
    gate.set()
    saver.close()
    assert first.result() == 0
    assert order == [0, 4]
    assert [f.cancelled() for f in queued] == [True, True, True, False]


def test_wait_mode_blocks_a_new_save_while_one_is_in_flight() -> None:
    saver = AsyncSaver(on_busy="wait")
    gate = threading.Event()
    saver.submit(lambda: gate.wait(timeout=30))
    submitted = threading.Event()
    threading.Thread(target=lambda: (saver.submit(lambda: None), submitted.set())).start()
    assert not submitted.wait(timeout=0.2)
    gate.set()
    assert submitted.wait(timeout=30)
    saver.close()


def test_pending_saves_are_flushed_at_interpreter_exit(tracking_store: str, tmp_path: Path) -> None:
    experiment_id = mlflow.create_experiment("exit", artifact_location=(tmp_path / "art").as_uri())
    run = MlflowClient().create_run(experiment_id)
    script = textwrap.dedent(
        f"""
        import time, torch, tracking
        from pipelines.models import Model
        from tracking import checkpoint

        real = checkpoint.commit_checkpoint
        def slow_commit(handle, snapshot, *args, **kwargs):
            time.sleep(1.0)  # still uploading when the script ends
            return real(handle, snapshot, *args, **kwargs)
        import tracking.checkpointer
        tracking.checkpointer.commit_checkpoint = slow_commit

        saver = tracking.Checkpointer(async_save=True, run_id={run.info.run_id!r})
        for epoch in (1, 2):
            saver.save(Model(6), epoch=epoch)
        print("script done", flush=True)
        # no close(): the Checkpointer must flush at exit
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**_env(), "MLFLOW_TRACKING_URI": tracking_store},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "script done" in child.stdout
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [1, 2]
    assert latest_tag(run.info.run_id) == 2


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_read_right_after_a_background_save_gets_that_checkpoint(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(6)
    # The upload stays in flight until someone waits for it: what a slow store does to a read right after the run.
    waited = threading.Event()
    commit = checkpoint.commit_checkpoint

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        assert waited.wait(timeout=60), "the upload was never waited for"
        return commit(*args, **kwargs)

    original_wait = AsyncSaver.wait

    def wait(self: AsyncSaver) -> None:
        waited.set()
        original_wait(self)

    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        monkeypatch.setattr(checkpoint, "commit_checkpoint", slow_commit)
        monkeypatch.setattr(AsyncSaver, "wait", wait)
        tracking.log_checkpoint(model, epoch=2, metrics={"val_loss": 0.1}, blocking=False)
    try:
        assert tracking.load(run.info.run_id).epoch == 2
        assert tracking.find_checkpoint(run.info.run_id, "best").manifest.epoch == 2
    finally:
        waited.set()
        tracking.wait_for_checkpoints()


def background_thread_alive() -> bool:
    """Whether the process's background save thread still runs, once it had 10 s to end."""
    deadline = time.monotonic() + 10
    while background_saves._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    return background_saves._worker is not None


@pytest.mark.parametrize("on_busy", ["wait", "coalesce"])
def test_the_background_thread_ends_when_idle_and_starts_on_demand(
    on_busy: str, caplog: pytest.LogCaptureFixture
) -> None:
    # For an owner never told that its work ended (a training loop that raised and was caught): no thread stays.
    tracking.wait_for_checkpoints()
    assert not background_thread_alive()
    one = AsyncSaver(on_busy=on_busy, log_when_idle=True)
    assert not background_thread_alive()  # none for a saver made
    assert one.submit(lambda: 1).result(timeout=30) == 1
    assert not background_thread_alive()
    assert one.submit(lambda: 2).result(timeout=30) == 2  # started again
    assert not background_thread_alive()

    def fail() -> None:
        raise OSError("the store refused the upload (test)")

    with caplog.at_level("ERROR", logger="tracking.saver"):
        one.submit(fail)
        assert not background_thread_alive()
    # Never silent: logged once the saver had nothing left to do, and raised to the owner that asks.
    assert any("refused the upload" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError, match="refused the upload"):
        one.wait()
    one.close()
