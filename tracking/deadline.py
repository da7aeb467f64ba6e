"""One deadline per operation: what a failed save or load may still spend on its follow-up requests.

A request to a silent server fails only once its own timeouts and retries are spent (about
30 s by default). The requests that follow the failure (check whether it went through after
all, abort the upload, mark the checkpoint FAILED) must not each wait that long again: they
share what remains of the operation's deadline, and whatever they have not finished by then
goes on in a daemon thread (never keeping the process alive) while the error is raised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# What a follow-up may spend when the deadline is already past, as a share of the bound: enough
# for a server that answers (milliseconds), short against one that does not.
GRACE_SHARE = 0.1


class Overdue(TimeoutError):
    """A follow-up did not finish by the deadline; it goes on in the background."""


class Deadline:
    """``bound`` seconds from ``start`` (a ``time.monotonic()`` reading; default now)."""

    def __init__(self, bound: float, start: float | None = None) -> None:
        self.bound = bound
        self.end = (time.monotonic() if start is None else start) + bound

    def remaining(self) -> float:
        """Seconds left, and never less than the grace a follow-up always gets."""
        return max(self.end - time.monotonic(), self.bound * GRACE_SHARE)

    def wait_for(self, call: Callable[[], T], name: str = "tracking-follow-up") -> T:
        """``call()``'s result, or its exception; :class:`Overdue` when it is still running at the deadline."""
        task: _Task[T] = _Task(call)
        # A daemon thread: one stuck on a silent server must not keep the process alive at exit.
        threading.Thread(target=task.run, name=name, daemon=True).start()
        if not task.done.wait(self.remaining()):
            raise Overdue(f"still waiting after {self.bound:g} s")
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[return-value]


class _Task(Generic[T]):
    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            self.error = exc
        finally:
            self.done.set()
