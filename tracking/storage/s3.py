"""The fast path for ``s3://`` artifact roots: streaming multipart writes, ranged parallel reads.

Writes stream into a multipart upload (see :mod:`tracking.storage.multipart`); reads
fetch ranges in parallel into one preallocated buffer, hashing in the same pass. Every
botocore error is mapped here to the library's own, naming the owner, object and next step.
The boto3 client comes from :mod:`tracking.storage.s3_client`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

from tracking.config import ENV_VARS, TrackingConfig, s3_attempts
from tracking.errors import ConfigError, IntegrityError, NotFoundError, StorageError
from tracking.manifest import StoredFile
from tracking.storage.base import ArtifactStore, Buffer, HashingWriter, Producer, StableProducer
from tracking.storage.multipart import DaemonPool, MultipartUpload
from tracking.storage.ranged import RangedRead, ReadRecord
from tracking.storage.s3_client import s3_client
from tracking.uri import S3Location, parse_s3_uri

# Reads move through memory in blocks of this size when streaming.
_COPY_BLOCK = 8 * 1024 * 1024


def _executor(workers: int) -> DaemonPool:
    """The shared part-upload pool of ``workers`` threads; the least recently asked for beyond the last few is
    retired, so that a process trying concurrency after concurrency keeps no idle threads of each."""
    with _pools_lock:
        pool = _pools.pop(workers, None) or DaemonPool(workers, "tracking-s3-part")
        _pools[workers] = pool  # the most recently asked for last
        while len(_pools) > _POOLS_KEPT:
            _pools.pop(next(iter(_pools))).retire()
        return pool


_POOLS_KEPT = 4
_pools: dict[int, DaemonPool] = {}
_pools_lock = threading.Lock()


class S3Store(ArtifactStore):
    """Fast path for ``s3://`` artifact URIs."""

    def __init__(self, artifact_uri: str, config: TrackingConfig, owner: str = "") -> None:
        super().__init__(artifact_uri, owner)
        self.root: S3Location = parse_s3_uri(artifact_uri)
        self.config = config
        self.client = s3_client(config)
        # Part uploads share one pool (at most max_concurrency parts of one file in flight, so two
        # writes proceed side by side); reads start threads of their own (see storage.ranged).
        self.pool = _executor(config.max_concurrency * 2)
        self.last_read = ReadRecord(0.0, 0.0, 0)  # how the last read went: see ReadRecord

    def write(self, path: str, produce: Producer) -> StoredFile:
        target = self.root.join(path)
        stable: Sequence[tuple[int, int]] = produce.stable if isinstance(produce, StableProducer) else ()
        upload = MultipartUpload(self.client, self.pool, target, self.config, stable, self.owner)
        with self._errors(path), upload:
            writer = HashingWriter(upload.feed)
            try:
                produce(cast(BinaryIO, writer))
            except Exception:
                # torch.save reports a failing write as its own RuntimeError ("unexpected pos"):
                # the upload's error is the one that says what happened.
                if upload.error is not None:
                    raise upload.error from None
                raise
            upload.finish()
        return writer.stored()

    def write_bytes(self, path: str, data: bytes) -> StoredFile:
        if len(data) > self.config.part_size:
            return super().write_bytes(path, data)
        target = self.root.join(path)
        with self._errors(path):
            self.client.put_object(Bucket=target.bucket, Key=target.key, Body=data)
        return StoredFile(len(data), hashlib.sha256(data).hexdigest())

    def read(
        self,
        path: str,
        expected: StoredFile | None = None,
        progress: Callable[[int], object] | None = None,
        limit: int | None = None,
    ) -> Buffer:
        """The file in a fresh, writable buffer (so tensors can share its memory), checked while it lands."""
        target = self.root.join(path)
        with self._errors(path):
            if expected is None:
                # Manifests and other small files: one GET, sized by its response (no HEAD first).
                return self._get_whole(target, path, limit)
            size = expected.size
            # The whole object's GET comes first, before the buffer and before any range is planned: its
            # answer says the object's real size, so a manifest claiming 10**15 bytes for a small file
            # fails here, in one request, instead of allocating or planning for what it claims.
            began = time.monotonic()
            first = self._get_range(target, (0, size), size)
            answered_in = time.monotonic() - began
            try:
                buffer = _new_buffer(size)
            except BaseException:
                first["Body"].close()
                raise
            reader = RangedRead(
                memoryview(buffer),
                self.config.part_size,
                self.config.max_concurrency - 1,
                get=lambda start, end: self._get_range(target, (start, end), size)["Body"],
                fill=lambda body, out, offset: self._fill(target, body, out, offset),
                close=_close,
            )
            digest = reader.run(first["Body"], answered_in, progress)
            self.last_read = ReadRecord(reader.answered_in, reader.first_part_s, reader.fanned_out)
        self._verify(path, buffer, digest, expected)
        return buffer

    def list_files(self, path: str) -> list[str]:
        prefix = self._prefix(path)
        names: list[str] = []
        with self._errors(path):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.root.bucket, Prefix=prefix):
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        return sorted(names)

    def delete(self, path: str) -> None:
        with self._errors(path):
            self.client.delete_object(Bucket=self.root.bucket, Key=self.root.join(path).key)

    def pending_uploads(self, path: str) -> list[str]:
        prefix = self._prefix(path)
        return sorted({key[len(prefix) :] for key, _ in self._uploads(path)})

    def abort_pending(self, path: str) -> list[str]:
        from botocore.exceptions import ClientError

        prefix = self._prefix(path)
        aborted: set[str] = set()
        for key, upload_id in self._uploads(path):
            name = key[len(prefix) :]
            with self._errors(f"{path.strip('/')}/{name}".lstrip("/")):
                try:
                    self.client.abort_multipart_upload(Bucket=self.root.bucket, Key=key, UploadId=upload_id)
                except ClientError as exc:
                    # Completed or aborted meanwhile by its writer: not pending any more either way.
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise
            aborted.add(name)
        return sorted(aborted)

    def _prefix(self, path: str) -> str:
        key = self.root.join(path).key
        return key.rstrip("/") + "/" if key else ""

    def _uploads(self, path: str) -> list[tuple[str, str]]:
        """(key, upload ID) of every unfinished multipart upload below ``path``."""
        found: list[tuple[str, str]] = []
        with self._errors(path):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.root.bucket, Prefix=self._prefix(path)):
                found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        return found

    def _get_whole(self, target: S3Location, path: str, limit: int | None) -> bytearray:
        response = self.client.get_object(Bucket=target.bucket, Key=target.key)
        size = int(response["ContentLength"])
        try:
            self._check_limit(path, size, limit)  # before a buffer of whatever size the object has
        except IntegrityError:
            response["Body"].close()
            raise
        buffer = bytearray(size)
        complete = False
        try:
            self._fill(target, response["Body"], memoryview(buffer), 0)
            complete = True
        finally:
            _close(response["Body"], complete)
        return buffer

    def _get_range(self, target: S3Location, byte_range: tuple[int, int], size: int) -> Any:
        """GET ``byte_range`` and check the object is ``size`` bytes long; the body is left to read."""
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
                f"{self.owner}: s3://{target.bucket}/{target.key} is {total} bytes, but its manifest "
                f"says {size}; the stored file was replaced or truncated. Load another checkpoint "
                "(e.g. checkpoint=<epoch>) or re-log it."
            )
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if "Range" in kwargs and status == 200 and not response.get("ContentRange"):
            # A server (or a proxy before it) may ignore a Range and send the whole object: read up to where the
            # range starts. Taken from the object's start, its bytes failed the hash as a corrupted checkpoint.
            self._skip(target, response["Body"], byte_range[0])
        return response

    def _skip(self, target: S3Location, body: Any, count: int) -> None:
        """Read and drop the first ``count`` bytes of ``body``."""
        scratch = memoryview(bytearray(min(count, _COPY_BLOCK)))
        skipped = 0
        try:
            while skipped < count:
                step = min(count - skipped, len(scratch))
                self._fill(target, body, scratch[:step], skipped)
                skipped += step
        except BaseException:
            body.close()
            raise

    def _fill(self, target: S3Location, body: Any, out: memoryview, offset: int) -> None:
        """Read the next ``len(out)`` bytes of ``body`` (bytes ``offset`` on of the object) into ``out``."""
        # urllib3's readinto reads into a new bytes object and copies that (0.1 s of CPU per
        # 512 MiB here); the http.client response beneath it reads straight into `out`.
        raw: Any = getattr(body, "_raw_stream", None)
        direct: Any = getattr(raw, "_fp", None)
        reader = direct if hasattr(direct, "readinto") and hasattr(raw, "release_conn") else body
        filled = 0
        while filled < len(out):
            n = reader.readinto(out[filled : filled + _COPY_BLOCK])
            if not n:
                # The response's own length was checked against the manifest before reading, so a
                # body that stops short is the connection dropping, not a shorter object.
                raise StorageError(
                    f"{self.owner}: the download of s3://{target.bucket}/{target.key} was cut off after "
                    f"{offset + filled} of {offset + len(out)} bytes (connection closed); the stored "
                    "object is not affected: retry."
                )
            filled += n

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        """Turn botocore's, urllib3's and http.client's exceptions into ours: the run, the object, what to do."""
        import http.client

        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from urllib3.exceptions import HTTPError as Urllib3Error
        from urllib3.exceptions import TimeoutError as Urllib3Timeout

        where = f"{self.owner}: {self.describe(path)}"
        # Where the client sends its requests, whichever setting chose it: MLFLOW_S3_ENDPOINT_URL, botocore's own
        # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or a profile's endpoint_url), else AWS's regional endpoint.
        endpoint = self.config.s3_endpoint_url or self.client.meta.endpoint_url
        setting = _endpoint_setting(self.config)
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ConfigError(
                f"{where}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
            ) from exc
        except ParamValidationError:
            raise  # a malformed request is a bug here, not something a retry fixes
        except (ConnectTimeoutError, ReadTimeoutError, Urllib3Timeout, TimeoutError) as exc:
            raise StorageError(
                f"{where}: S3 at {endpoint} did not answer in time ({exc}); retry. If it is up but slow, "
                f"raise {ENV_VARS['s3_read_timeout']} (now {self.config.s3_read_timeout:g} s) or "
                f"{ENV_VARS['s3_connect_timeout']} (now {self.config.s3_connect_timeout:g} s)."
            ) from exc
        except (EndpointConnectionError, BotoConnectionError) as exc:
            raise StorageError(
                f"{where}: cannot reach S3 at {endpoint} ({exc}); check {setting} "
                "and that the server runs (`tracking stack status`)."
            ) from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if exc.operation_name not in {"HeadObject", "HeadBucket"} and (code.isdecimal() or not code):
                # Only a HEAD's answer has no body; S3 says what went wrong in every other one.
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", code or "?")
                raise StorageError(
                    f"{where}: {endpoint} answered HTTP {status} with no S3 error in it: it is not an S3 "
                    "server (the MLflow server's address?); set MLFLOW_S3_ENDPOINT_URL to the S3 / MinIO "
                    "endpoint, e.g. http://127.0.0.1:9000."
                ) from exc
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise NotFoundError(f"{where}: no such artifact.") from exc
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{where}: bucket {self.root.bucket!r} does not exist; create it "
                    "(`tracking stack up` does) or point the experiment at an existing bucket."
                ) from exc
            if code == "AccessDenied":
                # The keys were accepted (a wrong key is InvalidAccessKeyId, a wrong secret
                # SignatureDoesNotMatch): a policy does not let them do this here.
                verb = "read" if exc.operation_name.startswith(("Get", "Head", "List")) else "write"
                raise StorageError(
                    f"{where}: S3 at {endpoint} denied the credentials the right to {verb} in bucket "
                    f"{self.root.bucket!r} (AccessDenied); ask for {verb} access to s3://{self.root.bucket}/"
                    f"{self.root.key} or point the experiment at a location these credentials may {verb}."
                ) from exc
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
                raise StorageError(
                    f"{where}: S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
                ) from exc
            if code in _EXPIRED_CREDENTIALS:
                raise StorageError(
                    f"{where}: S3 refused the session credentials as expired or invalid ({code}); refresh them "
                    "(`aws sso login`, or a new AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN), "
                    "then retry; no checkpoint was committed or changed by this failure."
                ) from exc
            if code == "RequestTimeTooSkewed":
                raise StorageError(
                    f"{where}: S3 refused the request as signed at the wrong time ({code}): this machine's clock is "
                    "off by more than 15 minutes; set it right (NTP), then retry."
                ) from exc
            if code in _TRANSIENT:
                raise StorageError(
                    f"{where}: S3 at {endpoint} kept answering {code} (attempts: {s3_attempts()}): it is "
                    f"overloaded, throttling or failing; retry later, or lower {ENV_VARS['max_concurrency']} (now "
                    f"{self.config.max_concurrency}) to send it fewer requests at once."
                ) from exc
            raise StorageError(f"{where}: S3 error {code}: {exc}") from exc
        except (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError) as exc:
            # Streaming errors, dropped connections, truncated responses: the transfer failed,
            # not the stored bytes (those are checked against the manifest, separately).
            raise StorageError(
                f"{where}: the S3 transfer failed ({type(exc).__name__}: {exc}); this is a network or "
                "server failure, not corruption, and nothing was committed by it: retry."
            ) from exc


# What S3 (and STS-issued session credentials) answer once a session token expired or is not the key's.
_EXPIRED_CREDENTIALS = frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken"})
# Answers botocore already retried with backoff: what is left to say is to wait, or to ask for less at once.
_TRANSIENT = frozenset({"SlowDown", "ServiceUnavailable", "503", "InternalError", "500", "RequestTimeout"})


def _endpoint_setting(config: TrackingConfig) -> str:
    """The variable that chose the S3 endpoint, for the error that says to check it."""
    if not config.s3_endpoint_url:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var):
                return var
    return ENV_VARS["s3_endpoint_url"]


def _new_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``size`` bytes to download into."""
    if size < _COPY_BLOCK or not hasattr(mmap, "MAP_PRIVATE"):
        return bytearray(size)
    # bytearray(size) zeroes every page before the first byte is requested (0.3 s per 512 MiB
    # here); a private anonymous mapping is zero-filled lazily, by the threads writing into it.
    # (Python's default for anonymous maps is MAP_SHARED: shared memory, slower to fault in.)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _close(body: Any, complete: bool) -> None:
    """End a GET's body: a connection read to its end serves the next request, any other is dropped."""
    raw: Any = getattr(body, "_raw_stream", None)
    direct: Any = getattr(raw, "_fp", None)
    try:
        if complete and direct is not None and direct.isclosed() and hasattr(raw, "release_conn"):
            raw.release_conn()
    finally:
        body.close()
