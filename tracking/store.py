"""Where a run's artifact bytes go: one small interface, two implementations.

``S3Store`` is the fast path for runs whose artifact URI is ``s3://``: it streams
writes into a multipart upload through a few bounded part buffers and reads with
ranged parallel GETs into one preallocated buffer, hashing in the same pass.
``MlflowStore`` serves every other artifact URI (``mlflow-artifacts:/`` through the
tracking server, ``file://``...) through MLflow's own artifact repository.
Both produce the same layout, so the rest of the library never asks which it has.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import posixpath
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from tracking.config import TrackingConfig
from tracking.errors import ConfigError, IntegrityError, NotFoundError, StorageError
from tracking.uri import S3Location, parse_s3_uri

# Reads and writes move through memory in blocks of this size when streaming.
_COPY_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """Size and SHA-256 of one stored file, as recorded in a manifest."""

    size: int
    sha256: str


Producer = Callable[[BinaryIO], object]


class ArtifactStore(ABC):
    """Reads and writes files under one run's artifact root, by relative path."""

    def __init__(self, run_id: str, artifact_uri: str) -> None:
        self.run_id = run_id
        self.artifact_uri = artifact_uri

    @abstractmethod
    def write(self, path: str, produce: Producer) -> StoredFile:
        """Store what ``produce`` writes to the stream it is given; nothing is stored if it raises."""

    def write_bytes(self, path: str, data: bytes) -> StoredFile:
        return self.write(path, lambda stream: stream.write(data))

    @abstractmethod
    def read(self, path: str, expected: StoredFile | None = None) -> bytes | bytearray:
        """Return a file's bytes, verified against ``expected`` when given."""

    @abstractmethod
    def list_files(self, path: str) -> list[str]:
        """Paths, relative to ``path``, of every file below it; empty when there are none."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Delete one file; deleting a missing file is not an error."""

    def describe(self, path: str) -> str:
        return f"{self.artifact_uri.rstrip('/')}/{path}"

    def _verify(self, path: str, data: bytes | bytearray, digest: str, expected: StoredFile | None) -> None:
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

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
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
        with self._errors(path), _MultipartUpload(self, target) as upload:
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

    def read(self, path: str, expected: StoredFile | None = None) -> bytes | bytearray:
        target = self.root.join(path)
        with self._errors(path):
            size = expected.size if expected else self._size(target)
            part = self.config.part_size
            if size <= part:
                data = self._get(target, None)
                self._verify(path, data, hashlib.sha256(data).hexdigest(), expected)
                return data
            buffer = bytearray(size)
            view = memoryview(buffer)
            ranges = [(start, min(start + part, size)) for start in range(0, size, part)]
            sha = hashlib.sha256()
            futures = _bounded_map(
                self.pool,
                self.config.max_concurrency,
                lambda r: self._get_into(target, view[r[0] : r[1]], r),
                ranges,
            )
            # Hash each range in order as soon as it lands, while later ranges download.
            for (start, end), future in zip(ranges, futures, strict=True):
                future.result()
                sha.update(view[start:end])
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

    def _size(self, target: S3Location) -> int:
        head = self.client.head_object(Bucket=target.bucket, Key=target.key)
        return int(head["ContentLength"])

    def _get(self, target: S3Location, byte_range: tuple[int, int] | None) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": target.bucket, "Key": target.key}
        if byte_range:
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        body = self.client.get_object(**kwargs)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def _get_into(self, target: S3Location, out: memoryview, byte_range: tuple[int, int]) -> None:
        body = self.client.get_object(
            Bucket=target.bucket, Key=target.key, Range=f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        )["Body"]
        try:
            filled = 0
            while filled < len(out):
                n = body.readinto(out[filled : filled + _COPY_BLOCK])
                if not n:
                    raise IntegrityError(
                        f"run {self.run_id}: {target} ended after {byte_range[0] + filled} bytes, "
                        f"expected {byte_range[1]}; the object is shorter than its manifest says."
                    )
                filled += n
        finally:
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

    Part buffers are preallocated and recycled, and at most ``max_concurrency + 1``
    exist at once, so memory stays bounded however large the file is. Any error
    aborts the upload, so no partial object ever appears.
    """

    def __init__(self, store: S3Store, target: S3Location) -> None:
        self.store = store
        self.target = target
        self.part_size = store.config.part_size
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.slots = threading.BoundedSemaphore(store.config.max_concurrency)
        self.spare: list[bytearray] = []
        self.spare_lock = threading.Lock()
        self.buffer = bytearray(self.part_size)
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
        while len(data):
            room = self.part_size - self.filled
            chunk = data[:room]
            self.buffer[self.filled : self.filled + len(chunk)] = chunk
            self.filled += len(chunk)
            data = data[len(chunk) :]
            if self.filled == self.part_size:
                self._send_part()

    def finish(self) -> None:
        client = self.store.client
        if self.upload_id is None:
            body = BufferReader(memoryview(self.buffer)[: self.filled])
            client.put_object(Bucket=self.target.bucket, Key=self.target.key, Body=body)
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
        buffer, size = self.buffer, self.filled
        with self.spare_lock:
            self.buffer = self.spare.pop() if self.spare else bytearray(self.part_size)
        self.filled = 0
        number = len(self.parts) + 1
        upload_id = self.upload_id

        def upload() -> dict[str, Any]:
            try:
                response = client.upload_part(
                    Bucket=self.target.bucket,
                    Key=self.target.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=BufferReader(memoryview(buffer)[:size]),
                )
                return {"PartNumber": number, "ETag": response["ETag"]}
            finally:
                with self.spare_lock:
                    self.spare.append(buffer)
                self.slots.release()

        self.parts.append(self.store.pool.submit(upload))


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

    def read(self, path: str, expected: StoredFile | None = None) -> bytes | bytearray:
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
