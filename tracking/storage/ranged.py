"""Downloading one S3 object into a buffer: one streamed GET, joined by ranged GETs where ranges pay.

The whole object is asked for first, in one GET: its answer says the object's real size
before anything is allocated, and on a server where ranges cost what they should, ranged
GETs for the far end of the object start at once, working towards the stream, until the two
meet. Whether ranges pay is measured on that first answer: a server that takes half as long
to answer as the first part's bytes take to arrive (moto's copies the whole object for every
GET, ranged or not) is read with the single stream alone, which costs what one plain GET does.
Every part is hashed in order as it lands, on the calling thread, while the rest downloads.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

# Fan out when the first answer came in under this share of the time the first part's bytes took
# to arrive: a ranged GET then costs little next to the bytes it brings. Measured at 256 MiB with
# 16 MiB parts: SeaweedFS answers in about 20 ms, against about 190 ms for the first part; moto's
# server in about 290 ms, against 40 ms (it copies the whole object before answering).
RANGES_PAY = 0.5


class ReadRecord(NamedTuple):
    """How one read went: seconds to the first answer and for the first part's bytes, and how many
    ranged GET threads joined the stream (0: the stream alone)."""

    answered_in: float
    first_part_s: float
    fanned_out: int


class RangedRead:
    """Fills ``view`` (the object's ``size`` bytes) from ``first``, the whole object's GET, and ranged GETs.

    ``get(start, end)`` sends a ranged GET (its body left to read), ``fill(body, out, offset)``
    reads ``len(out)`` bytes of a body, and ``close(body, complete)`` ends one. Every thread this
    starts is a daemon thread: one stuck on a silent server must not keep the process alive once
    the read has failed, and a failed read stops handing out parts at once.
    """

    def __init__(
        self,
        view: memoryview,
        part: int,
        workers: int,
        get: Callable[[int, int], Any],
        fill: Callable[[Any, memoryview, int], None],
        close: Callable[[Any, bool], None],
    ) -> None:
        self.view = view
        self.part = part
        self.workers = workers
        self.get, self.fill, self.close = get, fill, close
        self.count = max(1, -(-len(view) // part))
        self.changed = threading.Condition()
        self.done = [False] * self.count
        self.front = 0  # next part the stream reads (it reads them in order)
        self.back = self.count  # parts from here on are taken by ranged GETs
        self.error: BaseException | None = None
        self.stopped = False
        # What the decision was made on, and what it was: for the benchmark's record.
        self.answered_in = 0.0
        self.first_part_s = 0.0
        self.fanned_out = 0

    def run(self, first: Any, answered_in: float, progress: Callable[[int], object] | None = None) -> str:
        """The sha256 of the object, once every part landed; raises the first error any part met."""
        self.answered_in = answered_in
        threading.Thread(target=self._stream, args=(first,), name="tracking-s3-stream", daemon=True).start()
        sha = hashlib.sha256()
        try:
            for index in range(self.count):
                with self.changed:
                    while not self.done[index] and self.error is None:
                        self.changed.wait()
                    if self.error is not None:
                        raise self.error
                start, end = self._bounds(index)
                sha.update(self.view[start:end])
                if progress is not None:
                    progress(end - start)
        finally:
            with self.changed:
                self.stopped = True  # on an error (or Ctrl-C): no thread starts another request
        return sha.hexdigest()

    def _bounds(self, index: int) -> tuple[int, int]:
        return index * self.part, min((index + 1) * self.part, len(self.view))

    def _take(self, from_front: bool) -> int | None:
        """The next part for the stream (front) or a ranged GET (back); None once they met or it stopped."""
        with self.changed:
            if self.stopped or self.error is not None or self.front >= self.back:
                return None
            if from_front:
                self.front += 1
                return self.front - 1
            self.back -= 1
            return self.back

    def _landed(self, index: int) -> None:
        with self.changed:
            self.done[index] = True
            self.changed.notify_all()

    def _failed(self, exc: BaseException) -> None:
        with self.changed:
            if self.error is None:
                self.error = exc
            self.changed.notify_all()

    def _stream(self, body: Any) -> None:
        complete = False
        try:
            index = self._take(from_front=True)
            while index is not None:
                start, end = self._bounds(index)
                began = time.monotonic()
                self.fill(body, self.view[start:end], start)
                if index == 0:
                    self.first_part_s = time.monotonic() - began
                self._landed(index)
                if index == 0 and self.count > 2 and self.answered_in < RANGES_PAY * self.first_part_s:
                    self._fan_out()
                complete = end == len(self.view)
                index = self._take(from_front=True)
        except BaseException as exc:
            self._failed(exc)
        finally:
            # Stopped short (the ranged GETs have the rest): the connection is dropped, not reused.
            self.close(body, complete)

    def _fan_out(self) -> None:
        # The stream keeps one part for itself; the others are the ranged GETs'.
        self.fanned_out = min(self.workers, self.count - 2)
        for _ in range(self.fanned_out):
            threading.Thread(target=self._ranges, name="tracking-s3-range", daemon=True).start()

    def _ranges(self) -> None:
        try:
            index = self._take(from_front=False)
            while index is not None:
                start, end = self._bounds(index)
                body = self.get(start, end)
                complete = False
                try:
                    self.fill(body, self.view[start:end], start)
                    complete = True
                finally:
                    self.close(body, complete)
                self._landed(index)
                index = self._take(from_front=False)
        except BaseException as exc:
            self._failed(exc)
