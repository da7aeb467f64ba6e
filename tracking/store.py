"""Where a run's artifact bytes go: one small interface, two implementations.

``S3Store`` is the fast path for runs whose artifact URI is ``s3://``: it streams
writes into a multipart upload through a few bounded part buffers and reads with
ranged parallel GETs into one preallocated buffer, hashing in the same pass.
``MlflowStore`` serves every other artifact URI (``mlflow-artifacts:/`` through the
tracking server, ``file://``...) through MLflow's own artifact repository.
Both produce the same layout, so the rest of the library never asks which it has.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import mmap
import os
import posixpath
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from tracking.config import TrackingConfig
from tracking.errors import ConfigError, IntegrityError, NotFoundError, StorageError
from tracking.uri import S3Location, parse_s3_uri

# Reads and writes move through memory in blocks of this size when streaming.
_COPY_BLOCK = 8 * 1024 * 1024
# Writes at least this large, from memory the caller keeps unchanged, are uploaded from where
# they are; smaller ones (zip headers, small tensors) are copied into the part being built.
_BORROW_MIN = 64 * 1024


@dataclass(frozen=True)
class StoredFile:
    """Size and SHA-256 of one stored file, as recorded in a manifest."""

    size: int
    sha256: str


Producer = Callable[[BinaryIO], object]
# What a read returns: a large file comes in an anonymous memory mapping (see _new_buffer).
Buffer = bytes | bytearray | mmap.mmap


class ArtifactStore(ABC):
    """Reads and writes files under one run's artifact root, by relative path."""

    def __init__(self, run_id: str, artifact_uri: str) -> None:
        self.run_id = run_id
        self.artifact_uri = artifact_uri

    @abstractmethod
    def write(self, path: str, produce: Producer) -> StoredFile:
        """Store what ``produce`` writes to the stream it is given; nothing is stored if it raises.

        A producer with a ``stable`` attribute, a list of ``(address, end)`` memory ranges,
        promises that they stay unchanged until this returns (the tensors it saves): bytes it
        writes from inside them may then be uploaded from where they are, uncopied.
        """

    def write_bytes(self, path: str, data: bytes) -> StoredFile:
        return self.write(path, lambda stream: stream.write(data))

    @abstractmethod
    def read(self, path: str, expected: StoredFile | None = None) -> Buffer:
        """Return a file's bytes, verified against ``expected`` when given.

        Without ``expected`` (manifests, small files) the result is ``bytes`` or ``bytearray``.
        """

    @abstractmethod
    def list_files(self, path: str) -> list[str]:
        """Paths, relative to ``path``, of every file below it; empty when there are none."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Delete one file; deleting a missing file is not an error."""

    def describe(self, path: str) -> str:
        return f"{self.artifact_uri.rstrip('/')}/{path}"

    def _verify(self, path: str, data: Buffer, digest: str, expected: StoredFile | None) -> None:
        if expected is None:
            return
        if len(data) != expected.size or digest != expected.sha256:
            raise IntegrityError(
                f"run {self.run_id}: {path} does not match its manifest: expected "
                f"{expected.size} bytes with sha256 {expected.sha256}, found {len(data)} bytes with "
                f"sha256 {digest} at {self.describe(path)}. The stored file is corrupted or was "
                "replaced; load another checkpoint (e.g. checkpoint=<epoch>) or re-log it."
            )


class _HashingWriter(io.RawIOBase):
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


# --------------------------------------------------------------------------- S3


@functools.lru_cache(maxsize=8)
def s3_client(config: TrackingConfig) -> Any:
    """One boto3 client per configuration: clients are thread-safe and costly to build."""
    import boto3
    from botocore.config import Config

    if not config.aws_access_key_id and not _has_other_credentials():
        raise ConfigError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or an AWS profile), e.g. from `tracking stack up`."
        )
    botocore_config = Config(
        region_name=config.aws_region,
        max_pool_connections=max(10, config.max_concurrency * 2),
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=120,
        # The manifest's sha256 covers every byte end to end; skip botocore's own
        # per-request payload hashing and CRC checksums, which would hash it all twice more.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"payload_signing_enabled": False, "addressing_style": "path"},
    )
    session = boto3.session.Session(
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        region_name=config.aws_region,
    )
    return session.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        verify=not config.s3_ignore_tls,
        config=botocore_config,
    )


def _has_other_credentials() -> bool:
    return any(k in os.environ for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"))


@functools.lru_cache(maxsize=4)
def _executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tracking-s3")


class S3Store(ArtifactStore):
    """Fast path for ``s3://`` artifact URIs."""

    def __init__(self, run_id: str, artifact_uri: str, config: TrackingConfig) -> None:
        super().__init__(run_id, artifact_uri)
        self.root: S3Location = parse_s3_uri(artifact_uri)
        self.config = config
        self.client = s3_client(config)
        # Part uploads and ranged reads share one pool; reads of one file use at most
        # max_concurrency of it, so a write and a read can proceed side by side.
        self.pool = _executor(config.max_concurrency * 2)

    def write(self, path: str, produce: Producer) -> StoredFile:
        target = self.root.join(path)
        stable: Sequence[tuple[int, int]] = getattr(produce, "stable", ())
        with self._errors(path), _MultipartUpload(self, target, stable) as upload:
            writer = _HashingWriter(upload.feed)
            produce(cast(BinaryIO, writer))
            upload.finish()
        return writer.stored()

    def write_bytes(self, path: str, data: bytes) -> StoredFile:
        if len(data) > self.config.part_size:
            return super().write_bytes(path, data)
        target = self.root.join(path)
        with self._errors(path):
            self.client.put_object(Bucket=target.bucket, Key=target.key, Body=data)
        return StoredFile(len(data), hashlib.sha256(data).hexdigest())

    def read(self, path: str, expected: StoredFile | None = None) -> Buffer:
        """The file in a fresh, writable buffer (so tensors can share its memory), checked while it lands."""
        target = self.root.join(path)
        with self._errors(path):
            if expected is None:
                # Manifests and other small files: one GET, sized by its response (no HEAD first).
                data = self._get_whole(target)
                return data
            size = expected.size
            buffer = _new_buffer(size)
            view = memoryview(buffer)
            part = self.config.part_size
            ranges = [(start, min(start + part, size)) for start in range(0, size, part)] or [(0, 0)]
            sha = hashlib.sha256()
            if len(ranges) == 1:
                self._get_into(target, view, ranges[0], size)
                sha.update(view)
            else:
                futures = _bounded_map(
                    self.pool,
                    self.config.max_concurrency,
                    lambda r: self._get_into(target, view[r[0] : r[1]], r, size),
                    ranges,
                )
                try:
                    # Hash each range in order as soon as it lands, while later ranges download.
                    for (start, end), future in zip(ranges, futures, strict=True):
                        future.result()
                        sha.update(view[start:end])
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            self._verify(path, buffer, sha.hexdigest(), expected)
            return buffer

    def list_files(self, path: str) -> list[str]:
        prefix = self.root.join(path).key.rstrip("/") + "/"
        names: list[str] = []
        with self._errors(path):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.root.bucket, Prefix=prefix):
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        return sorted(names)

    def delete(self, path: str) -> None:
        with self._errors(path):
            self.client.delete_object(Bucket=self.root.bucket, Key=self.root.join(path).key)

    def _get_whole(self, target: S3Location) -> bytearray:
        response = self.client.get_object(Bucket=target.bucket, Key=target.key)
        buffer = bytearray(int(response["ContentLength"]))
        self._fill(target, response["Body"], memoryview(buffer), 0)
        return buffer

    def _get_into(self, target: S3Location, out: memoryview, byte_range: tuple[int, int], size: int) -> None:
        """Fill ``out`` with bytes ``byte_range`` of an object that should be ``size`` bytes long."""
        kwargs: dict[str, Any] = {"Bucket": target.bucket, "Key": target.key}
        if byte_range != (0, size):
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        response = self.client.get_object(**kwargs)
        # A ranged GET says the whole object's length after the slash: a longer object with
        # the expected bytes in front must fail too, not pass the hash.
        total = str(response.get("ContentRange", "")).rpartition("/")[2] or str(response.get("ContentLength"))
        if total.isdigit() and int(total) != size:
            response["Body"].close()
            raise IntegrityError(
                f"run {self.run_id}: s3://{target.bucket}/{target.key} is {total} bytes, but its manifest "
                f"says {size}; the stored file was replaced or truncated. Load another checkpoint "
                "(e.g. checkpoint=<epoch>) or re-log it."
            )
        self._fill(target, response["Body"], out, byte_range[0])

    def _fill(self, target: S3Location, body: Any, out: memoryview, offset: int) -> None:
        # urllib3's readinto reads into a new bytes object and copies that (0.1 s of CPU per
        # 512 MiB here); the http.client response beneath it reads straight into `out`.
        raw: Any = getattr(body, "_raw_stream", None)
        direct: Any = getattr(raw, "_fp", None)
        reader = direct if hasattr(direct, "readinto") and hasattr(raw, "release_conn") else body
        complete = False
        try:
            filled = 0
            while filled < len(out):
                n = reader.readinto(out[filled : filled + _COPY_BLOCK])
                if not n:
                    raise IntegrityError(
                        f"run {self.run_id}: s3://{target.bucket}/{target.key} ended after {offset + filled} "
                        f"bytes, expected {offset + len(out)}; the object is shorter than its manifest says."
                    )
                filled += n
            complete = True
        finally:
            if complete and reader is direct and direct.isclosed():
                raw.release_conn()  # read to its end: the connection can serve the next request
            body.close()

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        """Turn botocore's exceptions into ours, naming the run, the object and what to do."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"run {self.run_id}: {self.describe(path)}"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ConfigError(
                f"{where}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
            ) from exc
        except (EndpointConnectionError, BotoConnectionError) as exc:
            endpoint = self.config.s3_endpoint_url or "the AWS default endpoint"
            raise StorageError(
                f"{where}: cannot reach S3 at {endpoint} ({exc}); check MLFLOW_S3_ENDPOINT_URL "
                "and that the server runs (`tracking stack status`)."
            ) from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise NotFoundError(f"{where}: no such artifact.") from exc
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{where}: bucket {self.root.bucket!r} does not exist; create it "
                    "(`tracking stack up` does) or point the experiment at an existing bucket."
                ) from exc
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}:
                raise StorageError(
                    f"{where}: S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
                ) from exc
            raise StorageError(f"{where}: S3 error {code}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"{where}: the S3 transfer failed ({exc}); nothing was committed, retry.") from exc


def _new_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``size`` bytes to download into."""
    if size < _COPY_BLOCK or not hasattr(mmap, "MAP_PRIVATE"):
        return bytearray(size)
    # bytearray(size) zeroes every page before the first byte is requested (0.3 s per 512 MiB
    # here); a private anonymous mapping is zero-filled lazily, by the threads writing into it.
    # (Python's default for anonymous maps is MAP_SHARED: shared memory, slower to fault in.)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _bounded_map(
    pool: ThreadPoolExecutor, limit: int, fn: Callable[[Any], None], items: list[Any]
) -> list[Future[None]]:
    """Submit ``fn`` over ``items`` with at most ``limit`` running, without waiting here."""
    gate = threading.BoundedSemaphore(limit)

    def run(item: Any) -> None:
        with gate:
            fn(item)

    return [pool.submit(run, item) for item in items]


class _MultipartUpload:
    """Streams bytes into S3: one PUT when small, else parts uploaded by a worker pool.

    A part is a list of segments: views of the caller's memory where it is ``stable`` (the
    tensors being saved, uploaded without a copy), and a buffer of its own holding copies of
    everything else. At most ``max_concurrency`` parts are in flight and a copied byte
    belongs to one part only, so memory stays bounded however large the file is: at worst
    ``max_concurrency + 1`` parts' worth, when nothing can be borrowed. Any error aborts
    the upload, so no partial object ever appears.
    """

    def __init__(self, store: S3Store, target: S3Location, stable: Sequence[tuple[int, int]] = ()) -> None:
        self.store = store
        self.target = target
        self.part_size = store.config.part_size
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.slots = threading.BoundedSemaphore(store.config.max_concurrency)
        self.stable = sorted(stable)
        self.stable_starts = [start for start, _ in self.stable]
        # The part being built: borrowed views, and (start, end) slices of `copied`.
        self.segments: list[memoryview | tuple[int, int]] = []
        self.copied = bytearray()
        self.filled = 0
        self.done = False

    def __enter__(self) -> _MultipartUpload:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.done and self.upload_id is not None:
            for future in self.parts:
                future.cancel()
            for future in self.parts:
                if not future.cancelled():
                    future.exception()
            self.store.client.abort_multipart_upload(
                Bucket=self.target.bucket, Key=self.target.key, UploadId=self.upload_id
            )

    def feed(self, data: memoryview) -> None:
        borrow = len(data) >= _BORROW_MIN and self._is_stable(data)
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
        client = self.store.client
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
        client = self.store.client
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

        self.parts.append(self.store.pool.submit(upload))


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


# ----------------------------------------------------------------------- MLflow


class MlflowStore(ArtifactStore):
    """Any artifact URI MLflow understands, through its artifact repository."""

    def __init__(self, run_id: str, artifact_uri: str) -> None:
        super().__init__(run_id, artifact_uri)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.repo = get_artifact_repository(artifact_uri)

    def write(self, path: str, produce: Producer) -> StoredFile:
        # MLflow's repositories upload local files only, so stage the file in a temp dir.
        folder, name = posixpath.split(path)
        with tempfile.TemporaryDirectory(prefix="tracking-") as tmp, self._errors(path):
            local = os.path.join(tmp, name)
            with open(local, "wb") as fh:
                writer = _HashingWriter(fh.write)
                produce(cast(BinaryIO, writer))
            self.repo.log_artifact(local, folder or None)
        return writer.stored()

    def read(self, path: str, expected: StoredFile | None = None) -> Buffer:
        with tempfile.TemporaryDirectory(prefix="tracking-") as tmp, self._errors(path):
            local = self.repo.download_artifacts(path, dst_path=tmp)
            with open(local, "rb") as fh:
                data = fh.read()
        self._verify(path, data, hashlib.sha256(data).hexdigest(), expected)
        return data

    def list_files(self, path: str) -> list[str]:
        found: list[str] = []
        pending = [path]
        with self._errors(path):
            while pending:
                for info in self.repo.list_artifacts(pending.pop()):
                    if info.is_dir:
                        pending.append(info.path)
                    else:
                        found.append(posixpath.relpath(info.path, path))
        return sorted(found)

    def delete(self, path: str) -> None:
        with self._errors(path):
            self.repo.delete_artifacts(path)

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        where = f"run {self.run_id}: {self.describe(path)}"
        try:
            yield
        except (FileNotFoundError, NotFoundError) as exc:
            raise NotFoundError(f"{where}: no such artifact.") from exc
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "404" in str(exc):
                raise NotFoundError(f"{where}: no such artifact.") from exc
            raise StorageError(f"{where}: the artifact store failed: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"{where}: the artifact store failed: {exc}") from exc


def open_store(run_id: str, artifact_uri: str, config: TrackingConfig) -> ArtifactStore:
    """The fast S3 store for ``s3://`` artifact URIs, MLflow's repository otherwise."""
    if artifact_uri.startswith("s3://"):
        return S3Store(run_id, artifact_uri, config)
    return MlflowStore(run_id, artifact_uri)
