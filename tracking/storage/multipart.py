"""Streaming a file of any size into S3 through a few bounded, recycled part buffers."""

from __future__ import annotations

import bisect
import io
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tracking.config import TrackingConfig
from tracking.uri import S3Location

# Writes at least this large, from memory the caller keeps unchanged, are uploaded from where
# they are; smaller ones (zip headers, small tensors) are copied into the part being built.
BORROW_MIN = 64 * 1024


class MultipartUpload:
    """Streams bytes into S3: one PUT when small, else parts uploaded by a worker pool.

    A part is a list of segments: views of the caller's memory where it is ``stable`` (the
    tensors being saved, uploaded without a copy), and a buffer of its own holding copies of
    everything else. At most ``max_concurrency`` parts are in flight and a copied byte
    belongs to one part only, so memory stays bounded however large the file is: at worst
    ``max_concurrency + 1`` parts' worth, when nothing can be borrowed. Any error aborts
    the upload, so no partial object ever appears.
    """

    def __init__(
        self,
        client: Any,
        pool: ThreadPoolExecutor,
        target: S3Location,
        config: TrackingConfig,
        stable: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.client = client
        self.pool = pool
        self.target = target
        self.part_size = config.part_size
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

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.done and self.upload_id is not None:
            for future in self.parts:
                future.cancel()
            for future in self.parts:
                if not future.cancelled():
                    future.exception()
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.target.bucket, Key=self.target.key, UploadId=self.upload_id
                )
            except Exception:
                # Keep the error that stopped the upload (the abort usually fails for the same
                # reason); the upload it leaves behind is a leftover `tracking verify` reports.
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
            client.complete_multipart_upload(
                Bucket=self.target.bucket,
                Key=self.target.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
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
            created = client.create_multipart_upload(Bucket=self.target.bucket, Key=self.target.key)
            self.upload_id = created["UploadId"]
        # Fail fast: a part that already failed stops the stream instead of uploading the rest.
        for future in self.parts:
            if future.done() and future.exception():
                future.result()
        self.slots.acquire()
        body = self._take_part()
        number = len(self.parts) + 1
        upload_id = self.upload_id

        def upload() -> dict[str, Any]:
            try:
                response = client.upload_part(
                    Bucket=self.target.bucket,
                    Key=self.target.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": response["ETag"]}
            finally:
                self.slots.release()

        self.parts.append(self.pool.submit(upload))


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
