"""The interface every artifact store implements, and the streams it reads and writes through.

A store is bound to one artifact *root* URI (a run's, or any location MLflow hands
out) and addresses files below it by relative path. ``owner`` names what the root
belongs to (``run <id>``) in every error message.
"""

from __future__ import annotations

import hashlib
import io
import mmap
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol, runtime_checkable

from tracking.errors import IntegrityError
from tracking.manifest import StoredFile

# Writes a file's bytes to the stream it is given.
Producer = Callable[[BinaryIO], object]
# What a read returns: a large file comes in an anonymous memory mapping (see storage.s3).
Buffer = bytes | bytearray | mmap.mmap


@runtime_checkable
class StableProducer(Protocol):
    """A producer that promises its ``stable`` memory ranges stay unchanged until the write returns.

    ``stable`` lists ``(address, end)`` ranges (the tensors being saved): bytes written from
    inside them may be uploaded from where they are, uncopied.
    """

    def __call__(self, stream: BinaryIO) -> object: ...

    @property
    def stable(self) -> Sequence[tuple[int, int]]: ...


class ArtifactStore(ABC):
    """Reads and writes files under one artifact root, by relative path."""

    def __init__(self, artifact_uri: str, owner: str = "") -> None:
        self.artifact_uri = artifact_uri
        self.owner = owner or artifact_uri

    @abstractmethod
    def write(self, path: str, produce: Producer) -> StoredFile:
        """Store what ``produce`` writes to the stream it is given; nothing is stored if it raises."""

    def write_bytes(self, path: str, data: bytes) -> StoredFile:
        return self.write(path, lambda stream: stream.write(data))

    @abstractmethod
    def read(
        self,
        path: str,
        expected: StoredFile | None = None,
        progress: Callable[[int], object] | None = None,
        limit: int | None = None,
    ) -> Buffer:
        """Return a file's bytes, verified against ``expected`` when given.

        Without ``expected`` (manifests, small files) the result is ``bytes`` or ``bytearray``.
        ``progress`` is called with the number of bytes of each piece as it lands. A file larger
        than ``limit`` raises :class:`IntegrityError` before its bytes are read into memory.
        """

    @abstractmethod
    def list_files(self, path: str) -> list[str]:
        """Paths, relative to ``path``, of every file below it; empty when there are none."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Delete one file; deleting a missing file is not an error."""

    def pending_uploads(self, path: str) -> list[str]:
        """Paths, relative to ``path``, of files below it with an upload begun and never finished.

        An unfinished upload stores nothing readable but may hold space (S3 multipart parts) until
        aborted. Stores whose uploads leave nothing behind have none: the default.
        """
        return []

    def abort_pending(self, path: str) -> list[str]:
        """Abort every unfinished upload below ``path``; the paths (relative to ``path``) they were for."""
        return []

    def describe(self, path: str) -> str:
        return f"{self.artifact_uri.rstrip('/')}/{path}"

    def _check_limit(self, path: str, size: int, limit: int | None) -> None:
        if limit is not None and size > limit:
            raise IntegrityError(
                f"{self.owner}: {path} is {size} bytes at {self.describe(path)}, more than the {limit} such a file "
                "may have: it was replaced or corrupted, and is not read. Load another checkpoint (e.g. "
                "checkpoint=<epoch>) or log this one again."
            )

    def _verify(self, path: str, data: Buffer, digest: str, expected: StoredFile | None) -> None:
        if expected is None:
            return
        if len(data) != expected.size or digest != expected.sha256:
            raise IntegrityError(
                f"{self.owner}: {path} does not match its manifest: expected "
                f"{expected.size} bytes with sha256 {expected.sha256}, found {len(data)} bytes with "
                f"sha256 {digest} at {self.describe(path)}. The stored file is corrupted or was "
                "replaced; load another checkpoint (e.g. checkpoint=<epoch>) or re-log it."
            )


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: Callable[[memoryview], object]) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._sink(view)
        self.size += len(view)
        return len(view)

    def stored(self) -> StoredFile:
        return StoredFile(self.size, self.sha256.hexdigest())


class BufferReader(io.RawIOBase):
    """A seekable read-only stream over a buffer, so neither torch.load nor an upload copies it."""

    def __init__(self, data: Buffer | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(out)]
        out[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos
