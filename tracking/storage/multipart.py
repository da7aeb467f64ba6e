"""Streaming a file of any size into S3 through a few bounded, recycled part buffers."""

from __future__ import annotations

import bisect
import io
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from typing import Any, TypeVar

from tracking.config import ENV_VARS, S3_MAX_PART_MB, TrackingConfig
from tracking.deadline import Deadline
from tracking.errors import StorageError
from tracking.uri import S3Location

T = TypeVar("T")

# Writes at least this large, from memory the caller keeps unchanged, are uploaded from where
# they are; smaller ones (zip headers, small tensors) are copied into the part being built.
BORROW_MIN = 64 * 1024

# S3 takes at most 10,000 parts in one upload, and a streamed file's size is not known when it
# starts: parts double in size after every PARTS_PER_SIZE of them (up to S3's largest part), so
# that any file S3 stores fits (5 MB parts reach 4.9 TiB, 16 MB parts S3's 5 TiB limit) while a
# file of a few GB keeps the configured size. A fixed size failed the 10,001st part: 156 GiB with
# 16 MB parts, after the whole training and every byte before it was uploaded.
PARTS_PER_SIZE = 1_000
MAX_PART_SIZE = S3_MAX_PART_MB * 1024 * 1024


class MultipartUpload:
    """Streams bytes into S3: one PUT when small, else parts uploaded by a worker pool.

    A part is a list of segments: views of the caller's memory where it is ``stable`` (the
    tensors being saved, uploaded without a copy), and a buffer of its own holding copies of
    everything else. At most ``max_concurrency`` parts are in flight and a copied byte
    belongs to one part only, so memory stays bounded however large the file is: at worst
    ``max_concurrency + 1`` parts' worth, when nothing can be borrowed (parts grow past the
    first :data:`PARTS_PER_SIZE`, so that any file fits S3's 10,000 parts). Any error aborts the upload, so no
    partial object ever appears.
    """

    def __init__(
        self,
        client: Any,
        pool: DaemonPool,
        target: S3Location,
        config: TrackingConfig,
        stable: Sequence[tuple[int, int]] = (),
        owner: str = "",
    ) -> None:
        self.owner = owner or str(target)
        self.client = client
        self.pool = pool
        self.target = target
        self.first_part_size = config.part_size
        self.part_size = config.part_size
        self.bound = config.s3_request_bound()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.slots = threading.BoundedSemaphore(config.max_concurrency)
        self.stable = sorted(stable)
        self.stable_starts = [start for start, _ in self.stable]
        # The part being built: borrowed views, and (start, end) slices of `copied`.
        self.segments: list[memoryview | tuple[int, int]] = []
        self.copied = bytearray()
        self.filled = 0
        self.done = False
        self.error: BaseException | None = None
        # When the earliest request that failed was sent: the clean-up shares its deadline.
        self.failed_request_at: float | None = None
        self.failed_part: BaseException | None = None  # the first part upload that failed
        self.lock = threading.Lock()

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.done or self.upload_id is None:
            return
        for future in self.parts:
            future.cancel()
        upload_id = self.upload_id

        def abort() -> None:
            # S3 may still store a part that was in flight when the upload was aborted: let them end first.
            wait_all([f for f in self.parts if not f.cancelled()])
            self.client.abort_multipart_upload(Bucket=self.target.bucket, Key=self.target.key, UploadId=upload_id)

        # One deadline for the upload: when a request failed on a silent server (a part, after its
        # retries), the abort gets what remains of that request's bound, not a full bound of its own.
        deadline = Deadline(self.bound, start=self.failed_request_at)
        try:
            deadline.wait_for(abort, name="tracking-s3-abort")
        except Exception:
            # Keep the error that stopped the upload (the abort usually fails for the same reason,
            # or is still waiting on it); the upload it leaves behind is a leftover `tracking verify`
            # reports.
            if exc is None:
                raise

    def feed(self, data: memoryview) -> None:
        try:
            self._feed(data)
        except BaseException as exc:
            self.error = exc  # what the producer's own error handling may hide (see S3Store.write)
            raise

    def _feed(self, data: memoryview) -> None:
        borrow = len(data) >= BORROW_MIN and self._is_stable(data)
        while len(data):
            chunk = data[: self.part_size - self.filled]
            if borrow:
                self.segments.append(chunk)
            else:
                start = len(self.copied)
                self.copied += chunk
                last = self.segments[-1] if self.segments else None
                if isinstance(last, tuple) and last[1] == start:
                    self.segments[-1] = (last[0], start + len(chunk))
                else:
                    self.segments.append((start, start + len(chunk)))
            self.filled += len(chunk)
            data = data[len(chunk) :]
            if self.filled == self.part_size:
                self._send_part()

    def finish(self) -> None:
        client = self.client
        if self.upload_id is None:
            client.put_object(Bucket=self.target.bucket, Key=self.target.key, Body=self._take_part())
        else:
            if self.filled:
                self._send_part()
            parts = [future.result() for future in self.parts]
            upload_id = self.upload_id
            self._request(
                lambda: client.complete_multipart_upload(
                    Bucket=self.target.bucket,
                    Key=self.target.key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            )
        self.done = True

    def _is_stable(self, data: memoryview) -> bool:
        if not self.stable:
            return False
        import numpy

        # The only portable way to the address of a read-only buffer (torch.save hands those).
        address = int(numpy.frombuffer(data, dtype=numpy.uint8).ctypes.data)
        i = bisect.bisect_right(self.stable_starts, address) - 1
        return i >= 0 and address + len(data) <= self.stable[i][1]

    def _take_part(self) -> _SegmentReader:
        copied = memoryview(self.copied)
        views = [s if isinstance(s, memoryview) else copied[s[0] : s[1]] for s in self.segments]
        # The views keep this buffer alive until the part is uploaded; the next part starts a new one.
        self.copied = bytearray()
        self.segments = []
        self.filled = 0
        return _SegmentReader(views)

    def _send_part(self) -> None:
        client = self.client
        if self.upload_id is None:
            created = self._request(
                lambda: client.create_multipart_upload(Bucket=self.target.bucket, Key=self.target.key)
            )
            self.upload_id = created["UploadId"]
        # Fail fast: a part that already failed stops the stream instead of uploading the rest,
        # also when it is what freed the slot this part waited for.
        self._raise_failed()
        self.slots.acquire()
        try:
            self._raise_failed()
        except BaseException:
            self.slots.release()
            raise
        body = self._take_part()
        number = len(self.parts) + 1
        upload_id = self.upload_id

        def upload() -> dict[str, Any]:
            try:
                response = self._request(
                    lambda: client.upload_part(
                        Bucket=self.target.bucket,
                        Key=self.target.key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    )
                )
                etag = response.get("ETag")
                if not etag:
                    raise StorageError(
                        f"{self.owner}: S3 stored part {number} of s3://{self.target.bucket}/{self.target.key} but "
                        "answered with no ETag, which completing the upload needs: a proxy before the server drops "
                        f"the header, or the server is not S3-compatible. Let the ETag header through, or raise "
                        f"{ENV_VARS['part_size_mb']} above the checkpoint's size to store it in one PUT; nothing "
                        "was committed."
                    )
                return {"PartNumber": number, "ETag": etag}
            except BaseException as exc:
                with self.lock:
                    self.failed_part = self.failed_part or exc
                raise
            finally:
                self.slots.release()

        self.parts.append(self.pool.submit(upload))
        growth = 2 ** (len(self.parts) // PARTS_PER_SIZE)
        self.part_size = min(self.first_part_size * growth, MAX_PART_SIZE)

    def _raise_failed(self) -> None:
        # Noted by the part that failed: looking through every part's future before each new part
        # cost CPU time growing with the square of the part count (tens of seconds at 10,000 parts).
        if self.failed_part is not None:
            raise self.failed_part

    def _request(self, call: Callable[[], T]) -> T:
        """``call()``, noting when it was sent if it fails (see :meth:`__exit__`)."""
        sent = time.monotonic()
        try:
            return call()
        except BaseException:
            with self.lock:
                if self.failed_request_at is None or sent < self.failed_request_at:
                    self.failed_request_at = sent
            raise


class DaemonPool:
    """Worker threads for part uploads, as daemon threads.

    Unlike ThreadPoolExecutor's, whose workers the interpreter joins at exit, a worker stuck
    retrying on a silent server never keeps the process alive after the save has failed.
    A pool no longer shared (see :meth:`retire`) lets its workers end once its queue is empty.
    """

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self.name = name
        self.tasks: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self.running = 0  # workers started and not ended
        self.started = 0  # workers ever started, for their names
        self.retired = False
        self.lock = threading.Condition()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self.lock:
            self.tasks.append((future, call))
            if self.retired:
                # An upload that still holds the pool: workers come back for its parts, never more than the pool's
                # size (not one thread per part, for a file of thousands of parts), and end once none is queued.
                self._start(min(self.workers, len(self.tasks)) - self.running)
            else:  # all at the first upload: idle ones only wait for a task
                self._start(self.workers - self.running)
            self.lock.notify()
        return future

    def retire(self) -> None:
        """End the workers once the tasks queued are done, rather than leave them waiting forever on a pool that
        no new store takes; an upload still holding the pool goes on (its parts bring workers back)."""
        with self.lock:
            self.retired = True
            self.lock.notify_all()

    def _start(self, count: int) -> None:
        for _ in range(count):
            threading.Thread(target=self._work, name=f"{self.name}-{self.started}", daemon=True).start()
            self.running += 1
            self.started += 1

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.tasks and not self.retired:
                    self.lock.wait()
                if not self.tasks:  # retired, and nothing left to do
                    self.running -= 1
                    return
                future, call = self.tasks.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)


class _SegmentReader(io.RawIOBase):
    """A seekable read-only stream over several buffers in a row: one part's body, uncopied."""

    def __init__(self, segments: list[memoryview]) -> None:
        self._segments = [s for s in segments if len(s)]
        self._size = sum(len(s) for s in self._segments)
        self._pos = 0
        self._index = 0  # segment holding _pos
        self._offset = 0  # _pos - (start of that segment)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        out = memoryview(out).cast("B")
        done = 0
        while done < len(out) and self._index < len(self._segments):
            segment = self._segments[self._index]
            chunk = segment[self._offset : self._offset + len(out) - done]
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._offset += len(chunk)
            if self._offset == len(segment):
                self._index += 1
                self._offset = 0
        self._pos += done
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        self._index, self._offset, left = 0, 0, self._pos
        while self._index < len(self._segments) and left >= len(self._segments[self._index]):
            left -= len(self._segments[self._index])
            self._index += 1
        self._offset = left if self._index < len(self._segments) else 0
        return self._pos

    def tell(self) -> int:
        return self._pos
