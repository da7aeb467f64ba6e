"""Background checkpoint commits: the training loop blocks only for a host-memory snapshot.

One commit runs at a time in the process, in submission order whichever saver it was submitted
to, so the run's ``latest`` tag always ends at the newest checkpoint, and under a process group
each rank runs the commits' collectives in the same order (its program's). An error in the
background is re-raised on the saver's next ``submit``, ``wait`` or ``close``. A crash mid-upload
leaves the previous checkpoint as latest, because the manifest (the commit) is written last.

There is one story for every background save: ``log_checkpoint(blocking=False)`` uses the
process's shared saver (:func:`background_saver`), each ``Checkpointer(async_save=True)``
its own (it has its own ``on_busy`` policy); every live saver is known here, so
:func:`wait_for_checkpoints` and interpreter exit flush them all.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import thread as _futures_thread  # noqa: F401  (see _flush_at_exit)
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tracking.errors import one_line, print_error

T = TypeVar("T")

_log = logging.getLogger(__name__)

ON_BUSY = ("wait", "coalesce")


def to_host(value: Any) -> Any:
    """A copy of ``value`` whose tensors are detached host-memory copies.

    ``state_dict()`` returns live tensors that the next optimizer step overwrites, so
    a background upload must own a copy. CUDA tensors go through pinned buffers with
    one synchronisation at the end, rather than one blocking copy per tensor.
    """
    cuda_copies = False

    def copy(item: Any) -> Any:
        nonlocal cuda_copies
        if isinstance(item, torch.Tensor):
            if item.device.type == "cuda":
                cuda_copies = True
                host = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
                return host.copy_(item.detach(), non_blocking=True)
            return item.detach().clone()
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            copied = [copy(v) for v in item]
            return copied if isinstance(item, list) else type(item)(copied)
        return item

    result = copy(value)
    if cuda_copies:
        torch.cuda.synchronize()
    return result


def reserve_host_memory(value: Any, reserved: int = 0) -> int:
    """Have the pinned host memory that :func:`to_host` of ``value`` will take ready before it is needed.

    Allocating page-locked memory costs far more than copying into it (about 30 times the copy,
    for 2 GiB), and torch's caching host allocator keeps freed pinned blocks for the next request
    of their size. So a background thread allocates a block for each CUDA tensor of ``value`` and
    frees them all, and the next snapshot finds them: the first one too, when this ran before it.
    Returns the bytes now reserved; nothing is done while ``reserved`` already covers them.
    """
    tensors = [t for t in _leaves(value) if type(t) is torch.Tensor and t.device.type == "cuda"]
    needed = sum(t.numel() * t.element_size() for t in tensors)
    if needed <= reserved:
        return reserved
    sizes = [(t.shape, t.dtype) for t in tensors]

    def allocate() -> None:
        # All held at once, so that each is a block of its own when they go back to the cache.
        blocks = [torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in sizes]
        del blocks

    threading.Thread(target=allocate, name="tracking-pinned-reserve", daemon=True).start()
    return needed


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


# The name of the one thread that runs every AsyncSaver's jobs.
WORKER = "tracking-async-save"


@dataclass(eq=False)  # removed from the queue by identity
class _Entry:
    saver: AsyncSaver
    job: Callable[[], Any]
    future: Future[Any]


# Every saver's jobs, in one queue, in the order the training thread submitted them, run one at a time by one
# thread. Under a process group a job runs collectives on the coordination group; the order the program submits
# them in is the same on every rank, so their collectives are too. Two savers' jobs run at once would interleave
# their collectives in another order on each rank, and the job would hang.
_lock = threading.Condition()
_jobs: deque[_Entry] = deque()
_worker: threading.Thread | None = None  # running while _jobs holds work; started again by the next submit


class AsyncSaver:
    """Commits checkpoints in the background, at most one of its own in flight, after every job submitted before.

    Every saver's jobs run on one process-wide thread, in submission order. ``on_busy="wait"`` makes a new save
    wait for this saver's one in flight; ``"coalesce"`` queues it instead, replacing (and dropping) any save of
    this saver still queued, so a slow store costs skipped intermediate checkpoints rather than training time
    (not under a process group: ranks would drop different saves, so the Checkpointer refuses it there).
    ``log_when_idle=True``, for an owner that is never told its work ended (a training loop that raised): a
    failure it never asks about is logged as soon as the saver has nothing left to do.
    """

    def __init__(self, on_busy: str = "wait", *, log_when_idle: bool = False) -> None:
        if on_busy not in ON_BUSY:
            raise ValueError(f"on_busy must be one of {ON_BUSY}, got {on_busy!r}")
        self.on_busy = on_busy
        self._log_when_idle = log_when_idle
        self._queued: _Entry | None = None
        self._running: Future[Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        _live.add(self)

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` in the background after every job submitted before it, by any saver of this process.

        ``job`` must own its data: snapshot live tensors with :func:`to_host` first.
        """
        global _worker
        self._raise_pending_error()
        future: Future[T] = Future()
        with _lock:
            if self._closed:
                raise RuntimeError("this AsyncSaver is closed")
            if self.on_busy == "wait":
                while self._busy():
                    _lock.wait()
                self._raise_pending_error()
            elif self._queued is not None:
                _jobs.remove(self._queued)
                self._queued.future.cancel()  # superseded by this newer checkpoint
            self._queued = _Entry(self, job, future)
            _jobs.append(self._queued)
            if _worker is None:
                _worker = threading.Thread(target=_work, name=WORKER, daemon=True)
                _worker.start()
        return future

    def wait(self) -> None:
        """Block until every save submitted to this saver is committed; re-raise a background error."""
        if threading.current_thread() is _worker:
            raise RuntimeError(
                "a background save waited for background saves (wait(), tracking.wait_for_checkpoints(), a read "
                "that flushes them): they run after it, one at a time, so it would wait for good; wait from the "
                "training loop instead"
            )
        with _lock:
            while self._busy():
                _lock.wait()
        self._raise_pending_error()

    def close(self) -> None:
        """Flush, then refuse new saves."""
        try:
            self.wait()
        finally:
            with _lock:
                self._closed = True

    def _busy(self) -> bool:
        return self._running is not None or self._queued is not None

    def _raise_pending_error(self) -> None:
        with _lock:
            error, self._error = self._error, None
            _unreported.discard(self)
        if error is not None:
            raise error


def _work() -> None:
    """Run the queued jobs one at a time, in order; end once none is left."""
    global _worker
    while True:
        with _lock:
            if not _jobs:
                _worker = None
                return
            entry = _jobs.popleft()
            saver, job, future = entry.saver, entry.job, entry.future
            saver._queued = None
            del entry
            if not future.set_running_or_notify_cancel():  # its caller cancelled it while it was queued
                _lock.notify_all()
                continue
            saver._running = future
        try:
            future.set_result(job())
        except BaseException as exc:
            future.set_exception(exc)
            with _lock:
                saver._error = exc
                if not saver._log_when_idle:
                    _unreported.add(saver)
        finally:
            # Drop the job, and the host snapshot it holds, now: kept until the next save
            # arrives, it would double the memory of the next snapshot and be freed in its time.
            del job
            with _lock:
                saver._running = None
                if saver._log_when_idle and saver._error is not None and not saver._busy():
                    # Its owner may never wait again (its training raised, and was caught): said here too.
                    _log.error("a background checkpoint save failed: %s", one_line(saver._error))
                _lock.notify_all()
            del saver


# Every saver not yet garbage collected: flushed together by wait_for_checkpoints() and at exit.
_live: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
# The savers whose failure nobody was told of yet, kept alive (their owner may have dropped them, a Checkpointer
# never closed) so that the exit flush reports it.
_unreported: set[AsyncSaver] = set()


@functools.cache
def background_saver() -> AsyncSaver:
    """The process's shared saver, behind ``log_checkpoint(..., blocking=False)``."""
    return AsyncSaver()


def wait_for_checkpoints() -> None:
    """Block until every background checkpoint save in this process is committed; re-raise a failure.

    Covers ``log_checkpoint(..., blocking=False)`` and every ``Checkpointer(async_save=True)``.
    """
    errors = []
    for saver in list(_live):
        try:
            saver.wait()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def raise_background_errors() -> None:
    """Re-raise the first error of a background save not yet reported, from any saver."""
    for saver in list(_live):
        saver._raise_pending_error()


# A background error that surfaced only while flushing at exit: the process must not exit 0.
_failed_at_exit: list[BaseException] = []


def _flush_at_exit() -> None:
    for saver in list(_live):
        try:
            saver.close()
        except BaseException as exc:
            _failed_at_exit.append(exc)
            print_error(f"a background checkpoint save failed: {type(exc).__name__}: {one_line(exc)}")


def _exit_failed() -> None:
    """End the process with status 1 when a background save failed and nobody saw the error."""
    if not _failed_at_exit:
        return
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        # os._exit skips the atexit handler that would end it as FINISHED: it failed.
        try:
            mlflow.end_run(status="FAILED")
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# Pending saves must be flushed before interpreter shutdown stops the thread pools the upload
# needs. concurrent.futures refuses new work from its own hook in threading's exit hooks, which
# run before atexit's, in reverse order of registration: a plain atexit handler would be too
# late, and there is no public hook that runs earlier, so this registers where
# concurrent.futures itself does, after it (its thread module is imported above for that).
threading._register_atexit(_flush_at_exit)  # type: ignore[attr-defined]
# Python has no way to change the exit status once the program ended but os._exit; registered
# at import, so it runs after the atexit handlers registered later (LIFO).
atexit.register(_exit_failed)


def settle_before_collective() -> None:
    """Under a process group, before the calling thread's first collective of a save or load: let this process's
    background saves commit first (raising a failed one's error). They run their own collectives on the same group
    from the background thread; one begun meanwhile would interleave with them, in another order on each rank, and
    the job would hang. Nothing on the background thread itself, whose jobs those collectives are, and which runs
    them one at a time."""
    if threading.current_thread() is not _worker:
        wait_for_checkpoints()
