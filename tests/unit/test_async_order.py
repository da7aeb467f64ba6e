"""Several background savers in one process: one order for all their jobs, each saver's own waits and errors.

Under a process group each job runs collectives, which must run in the same order on every rank: the order the
program submitted them in (tests/unit/test_sharded_ranks.py proves it on two ranks).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

import pytest

import tracking
from tracking.saver import AsyncSaver, settle_before_collective


class Jobs:
    """Jobs that record the order they ran in, and fail the test when two of them run at once."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.started = {name: threading.Event() for name in ("a1", "a2", "a3", "b1", "b2", "c1")}
        self._running = threading.Semaphore(1)

    def job(self, name: str, before_end: Callable[[], Any] = lambda: None) -> Callable[[], str]:
        def run() -> str:
            assert self._running.acquire(blocking=False), f"{name} ran beside another job"
            try:
                self.started[name].set()
                before_end()
                self.order.append(name)
                return name
            finally:
                self._running.release()

        return run

    def anyone_else_started(self, name: str) -> bool:
        return any(event.is_set() for other, event in self.started.items() if other != name)


def test_the_jobs_of_several_savers_run_one_at_a_time_in_the_order_they_were_submitted() -> None:
    a, b, c = AsyncSaver(), AsyncSaver(), AsyncSaver()
    jobs = Jobs()
    overlapped: list[bool] = []
    # a1 runs as the others are submitted; none may start before it ends (a bounded wait: a job that starts
    # beside it sets its event at once).
    first = a.submit(jobs.job("a1", lambda: overlapped.append(jobs.started["b1"].wait(timeout=0.5))))
    assert jobs.started["a1"].wait(timeout=30)
    futures = [first, b.submit(jobs.job("b1")), c.submit(jobs.job("c1"))]
    futures += [a.submit(jobs.job("a2")), b.submit(jobs.job("b2"))]  # each waits for its saver's own first
    tracking.wait_for_checkpoints()
    assert overlapped == [False]
    assert jobs.order == ["a1", "b1", "c1", "a2", "b2"]
    assert [f.result() for f in futures] == ["a1", "b1", "c1", "a2", "b2"]


def test_a_savers_wait_returns_once_its_own_jobs_and_those_before_them_are_done() -> None:
    a, b, c = AsyncSaver(), AsyncSaver(), AsyncSaver()
    jobs = Jobs()
    first_gate, last_gate = threading.Event(), threading.Event()
    first = a.submit(jobs.job("a1", lambda: first_gate.wait(timeout=30)))
    b.submit(jobs.job("b1"))
    last = c.submit(jobs.job("c1", lambda: last_gate.wait(timeout=30)))
    first_gate.set()
    b.wait()  # not c's job, submitted after b's and still held
    assert first.done() and jobs.order == ["a1", "b1"] and not last.done()
    last_gate.set()
    c.wait()
    assert jobs.order == ["a1", "b1", "c1"]


def test_coalesce_drops_its_queued_save_and_queues_the_newer_one_after_the_other_savers_jobs() -> None:
    coalescing, waiting = AsyncSaver(on_busy="coalesce"), AsyncSaver()
    jobs = Jobs()
    gate = threading.Event()
    first = coalescing.submit(jobs.job("a1", lambda: gate.wait(timeout=30)))
    assert jobs.started["a1"].wait(timeout=30)
    dropped = coalescing.submit(jobs.job("a2"))
    waiting.submit(jobs.job("b1"))
    newest = coalescing.submit(jobs.job("a3"))
    gate.set()
    tracking.wait_for_checkpoints()
    assert jobs.order == ["a1", "b1", "a3"]
    assert (first.result(), dropped.cancelled(), newest.result()) == ("a1", True, "a3")


def test_a_failed_job_is_raised_by_its_own_saver_only_and_the_jobs_after_it_run() -> None:
    failing, other = AsyncSaver(), AsyncSaver()

    def fail() -> None:
        raise OSError("the store refused the upload (test)")

    failed = failing.submit(fail)
    after = other.submit(lambda: "committed")
    other.wait()  # nothing to raise: the failure is the other saver's
    assert after.result() == "committed"
    assert isinstance(failed.exception(timeout=30), OSError)
    with pytest.raises(OSError, match="refused the upload"):
        failing.wait()
    failing.wait()  # said once


def test_a_failure_of_a_saver_its_owner_dropped_is_still_raised_by_the_flush() -> None:
    # A Checkpointer never closed: the failure must reach wait_for_checkpoints() and the flush at exit.
    dropped = AsyncSaver()

    def fail() -> None:
        raise OSError("the store refused the upload (test)")

    failed = dropped.submit(fail)
    failed.exception(timeout=30)
    del dropped
    gc.collect()
    with pytest.raises(OSError, match="refused the upload"):
        tracking.wait_for_checkpoints()


def test_a_job_that_waits_for_background_saves_is_told_it_would_wait_for_good() -> None:
    # Each job runs after those submitted before it: waiting for the ones after it would never end.
    saver, later = AsyncSaver(), AsyncSaver()
    gate = threading.Event()

    def waits() -> None:
        gate.wait(timeout=30)
        later.wait()

    waiting = saver.submit(waits)
    later.submit(lambda: None)
    gate.set()
    error = waiting.exception(timeout=30)
    assert isinstance(error, RuntimeError) and "would wait for good" in str(error)
    with pytest.raises(RuntimeError):
        saver.wait()
    later.wait()


def test_a_job_settles_before_its_own_collectives_without_waiting_for_the_jobs_after_it() -> None:
    saver, later = AsyncSaver(), AsyncSaver()
    gate = threading.Event()

    def commit() -> str:
        gate.wait(timeout=30)
        settle_before_collective()  # what a background commit's first collective calls
        return "committed"

    committing = saver.submit(commit)
    later.submit(lambda: None)
    gate.set()
    assert committing.result(timeout=30) == "committed"
    later.wait()


def test_a_save_its_caller_cancelled_while_queued_is_skipped_and_the_next_ones_run() -> None:
    saver, other = AsyncSaver(on_busy="coalesce"), AsyncSaver()
    jobs = Jobs()
    gate = threading.Event()
    saver.submit(jobs.job("a1", lambda: gate.wait(timeout=30)))
    assert jobs.started["a1"].wait(timeout=30)
    cancelled = saver.submit(jobs.job("a2"))
    assert cancelled.cancel()
    later = other.submit(jobs.job("b1"))
    gate.set()
    assert later.result(timeout=30) == "b1"
    tracking.wait_for_checkpoints()
    assert jobs.order == ["a1", "b1"]
