"""Any artifact root MLflow understands (``mlflow-artifacts:/`` proxy, ``file://``...), through its repository."""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

from tracking.errors import ConfigError, NotFoundError, StorageError
from tracking.manifest import StoredFile
from tracking.storage.base import ArtifactStore, Buffer, HashingWriter, Producer


class MlflowStore(ArtifactStore):
    """Any artifact URI MLflow understands, through its artifact repository."""

    def __init__(self, artifact_uri: str, owner: str = "") -> None:
        super().__init__(artifact_uri, owner)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.repo = get_artifact_repository(artifact_uri)

    def write(self, path: str, produce: Producer) -> StoredFile:
        # MLflow's repositories upload local files only, so stage the file in a temp dir.
        folder, name = posixpath.split(path)
        with self._staging(path, "write") as tmp:
            local = os.path.join(tmp, name)
            # Only the staged file's own opening and writes are this machine's disk, said as such; the producer's
            # other failures are the save's, as on S3.
            disk: list[OSError] = []
            try:
                with self._errors(path):
                    with _noting(disk):
                        fh = open(local, "wb")  # noqa: SIM115 (closed by the with below, once opened)
                    with fh:

                        def sink(data: memoryview) -> None:
                            with _noting(disk):
                                fh.write(data)

                        writer = HashingWriter(sink)
                        produce(cast(BinaryIO, writer))
                        with _noting(disk):
                            fh.flush()
            except Exception:
                # torch.save reports a failing write as its own RuntimeError ("unexpected pos").
                if disk:
                    with self._local(path, "write", tmp):
                        raise disk[0] from None
                raise
            with self._errors(path):
                self.repo.log_artifact(local, folder or None)
        return writer.stored()

    def read(
        self,
        path: str,
        expected: StoredFile | None = None,
        progress: Callable[[int], object] | None = None,
        limit: int | None = None,
    ) -> Buffer:
        with self._staging(path, "make") as tmp:
            with self._errors(path, staged_in=tmp):
                self._refuse_missing(path)
                local = self._download(path, tmp)
            with self._local(path, "read", tmp):
                size = os.path.getsize(local)
                self._check_limit(path, size, limit)
                # A writable buffer, as S3's read gives: the loader's tensors then share it (see tracking.zerocopy).
                # Read-only bytes were copied by torch.load, holding the checkpoint twice over at its peak.
                data = bytearray(size)
                with open(local, "rb") as fh:
                    got = fh.readinto(data)
                if got != size:
                    raise OSError(errno.EIO, f"{local} changed size while read: {got} of {size} bytes")
        self._verify(path, data, hashlib.sha256(data).hexdigest(), expected)
        if progress is not None:
            progress(len(data))  # MLflow's repository downloads in one go
        return data

    def _download(self, path: str, tmp: str) -> str:
        """Copy the file at ``path`` into ``tmp``: its local path.

        MLflow's ``download_artifacts`` draws a tqdm bar on stderr for every call ("Downloading artifacts 1/1"), so a
        load printed several, and MLflow has no parameter to say otherwise, only MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
        which every thread of the process reads. The file is one file: its repository's own download of one file
        (``_download_file``, which every repository implements and ``download_artifacts`` calls per file) skips that
        bar and the request that asks whether ``path`` is a folder, touching nothing the user's own MLflow calls
        see. A user who set the variable to true gets MLflow's download, bars and all.
        """
        if os.environ.get(_BARS, "").strip().lower() in ("true", "1"):
            return cast(str, self.repo.download_artifacts(path, dst_path=tmp))
        local = os.path.join(tmp, posixpath.basename(path))
        self.repo._download_file(remote_file_path=path, local_path=local)
        return local

    def _refuse_missing(self, path: str) -> None:
        """NotFoundError unless ``path`` is a file of its folder's listing. MLflow's proxy (``mlflow-artifacts:/``,
        3.18) answers the download of a missing file with 500s, which its client retries for seconds and then
        reports as a failed server, not as a file that is not there (a manifest not written yet, the usual case)."""
        folder, name = posixpath.split(path)
        listed = self.repo.list_artifacts(folder or None)
        if not any(not info.is_dir and posixpath.basename(info.path) == name for info in listed):
            raise NotFoundError(path)

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
    def _staging(self, path: str, verb: str) -> Iterator[str]:
        """A temp folder to stage the file in; failing to make one is this machine's problem, not the store's."""
        with self._local(path, verb, tempfile.gettempdir()):
            staging = tempfile.TemporaryDirectory(prefix="tracking-")
        with staging as tmp:
            yield tmp

    @contextmanager
    def _local(self, path: str, verb: str, folder: str) -> Iterator[None]:
        """A local disk's error while staging (a full or unwritable temp folder), said as such, with what to do.

        Left to :meth:`_errors`, it read as a network failure, with the advice to check the tracking server.
        """
        try:
            yield
        except OSError as exc:
            raise ConfigError(
                f"{self.owner}: {self.describe(path)}: cannot {verb} the local copy that MLflow's artifact "
                f"repository needs, in {folder} ({exc.strerror or exc}); this machine's disk failed, not the "
                "store: free space there, or set TMPDIR to a folder with room for the file, then retry."
            ) from exc

    @contextmanager
    def _errors(self, path: str, staged_in: str | None = None) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        where = f"{self.owner}: {self.describe(path)}"
        try:
            yield
        except (FileNotFoundError, NotFoundError) as exc:
            raise NotFoundError(f"{where}: no such artifact.") from exc
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or _NOT_FOUND.search(str(exc)):
                raise NotFoundError(f"{where}: no such artifact.") from exc
            if staged_in is not None and any(f"[Errno {number}]" in str(exc) for number in _DISK_FULL):
                # MLflow's download gathers each file's failure into one message, keeping only its text.
                with self._local(path, "make", staged_in):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
            raise StorageError(f"{where}: the artifact store failed ({exc}); retry.") from exc
        except OSError as exc:
            staged = isinstance(exc.filename, str) and staged_in is not None and exc.filename.startswith(staged_in)
            if staged_in is not None and (staged or exc.errno in _DISK_FULL):
                # The download's own write into the staging folder, not the transfer.
                with self._local(path, "make", staged_in or tempfile.gettempdir()):
                    raise
            if getattr(getattr(exc, "response", None), "status_code", None) == 404:
                # requests' HTTPError of a proxied download: a file deleted since its folder was listed.
                raise NotFoundError(f"{where}: no such artifact.") from exc
            # requests' and urllib3's transport errors are OSErrors: a network failure, not corruption.
            raise StorageError(
                f"{where}: the artifact store failed ({exc}); a network or server failure, not corruption: "
                "check that the tracking server runs (MLFLOW_TRACKING_URI), then retry."
            ) from exc


# An HTTP 404 in MLflow's message ("404 Client Error", "(404)"), not the digits inside an ID or a path of it: a
# model ID such as m-...cd404fd... turned any failure on that model into "no such artifact", and a checkpoint
# into one without a manifest.
_NOT_FOUND = re.compile(r"(?<![0-9A-Za-z/_-])404(?![0-9A-Za-z/_-])")

# MLflow's switch for its tqdm bars; see MlflowStore._download.
_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

# A local disk that is full (or over quota): no network error has these.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextmanager
def _noting(errors: list[OSError]) -> Iterator[None]:
    """Note an OSError in ``errors`` on its way out."""
    try:
        yield
    except OSError as exc:
        errors.append(exc)
        raise
