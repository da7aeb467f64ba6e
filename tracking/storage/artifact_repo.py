"""Any artifact root MLflow understands (``mlflow-artifacts:/`` proxy, ``file://``...), through its repository."""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

from tracking.errors import NotFoundError, StorageError
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
        with tempfile.TemporaryDirectory(prefix="tracking-") as tmp, self._errors(path):
            local = os.path.join(tmp, name)
            with open(local, "wb") as fh:
                writer = HashingWriter(fh.write)
                produce(cast(BinaryIO, writer))
            self.repo.log_artifact(local, folder or None)
        return writer.stored()

    def read(
        self, path: str, expected: StoredFile | None = None, progress: Callable[[int], object] | None = None
    ) -> Buffer:
        with tempfile.TemporaryDirectory(prefix="tracking-") as tmp, self._errors(path):
            local = self.repo.download_artifacts(path, dst_path=tmp)
            with open(local, "rb") as fh:
                data = fh.read()
        self._verify(path, data, hashlib.sha256(data).hexdigest(), expected)
        if progress is not None:
            progress(len(data))  # MLflow's repository downloads in one go
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

        where = f"{self.owner}: {self.describe(path)}"
        try:
            yield
        except (FileNotFoundError, NotFoundError) as exc:
            raise NotFoundError(f"{where}: no such artifact.") from exc
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "404" in str(exc):
                raise NotFoundError(f"{where}: no such artifact.") from exc
            raise StorageError(f"{where}: the artifact store failed ({exc}); retry.") from exc
        except OSError as exc:
            # requests' and urllib3's transport errors are OSErrors: a network failure, not corruption.
            raise StorageError(
                f"{where}: the artifact store failed ({exc}); a network or server failure, not corruption: "
                "check that the tracking server runs (MLFLOW_TRACKING_URI), then retry."
            ) from exc
