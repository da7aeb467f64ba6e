"""A checkpoint or state dict found in the store: its manifest read, where its files are, its data not read yet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tracking import layout
from tracking.catalog import LoggedCheckpoint, StoredCheckpoint
from tracking.errors import NotFoundError
from tracking.manifest import Manifest
from tracking.run import RunHandle
from tracking.storage import ArtifactStore, Buffer


@dataclass(frozen=True)
class Located:
    """A manifest and where its files are: a checkpoint's logged model, or a run's ``state_dict/``."""

    run_id: str
    store: ArtifactStore
    folder: str  # "" for a checkpoint (the root of its logged model), "state_dict" for a state dict
    manifest: Manifest
    model_id: str | None = None

    @property
    def file(self) -> str:
        """The data file the manifest lists."""
        return (
            layout.CHECKPOINT_FILE if layout.CHECKPOINT_FILE in self.manifest.files else next(iter(self.manifest.files))
        )

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def read(self, name: str, progress: Callable[[int], object] | None = None) -> Buffer:
        """One of its files, checked against the manifest's size and sha256."""
        try:
            return self.store.read(self.path(name), self.manifest.files[name], progress=progress)
        except NotFoundError:
            raise missing_file(self.run_id, self.label, name, self.store.describe(self.path(name))) from None

    @property
    def label(self) -> str:
        """How messages name it: ``checkpoint-epoch-0007 (m-...)`` or ``state_dict``."""
        if self.model_id is None:
            return self.folder
        return f"{self.name} ({self.model_id})"

    @property
    def name(self) -> str:
        """Its logged model's name (``checkpoint-epoch-0007``, ``checkpoint-step-00001500``), else its folder."""
        if self.model_id is None:
            return self.folder
        return layout.checkpoint_name(self.manifest.key or 0, self.manifest.keyed_by)

    def logged(self) -> LoggedCheckpoint:
        uri = self.store.artifact_uri if self.model_id else None
        name = self.name
        return LoggedCheckpoint(self.run_id, name, self.manifest, self.model_id, uri)


def missing_file(run_id: str, label: str, name: str, where: str) -> NotFoundError:
    """A file a manifest lists that the store no longer has: the checkpoint was damaged after its commit."""
    return NotFoundError(
        f"run {run_id}: {label}: {name} is listed in its manifest but missing from the store ({where}); it was "
        "deleted. Load or download another checkpoint (`tracking checkpoints` lists them)."
    )


def locate(stored: StoredCheckpoint) -> Located:
    """A checkpoint logged model with its manifest read: the manifest, not the status, says it exists."""
    try:
        manifest = stored.read_manifest()
    except NotFoundError:
        raise NotFoundError(
            f"{stored.uri} ({stored.name} of run {stored.run_id}, status {stored.status}) has no manifest: the "
            "save did not commit, or the checkpoint was deleted. Load another checkpoint of the run."
        ) from None
    return Located(stored.run_id, stored.store, "", manifest, stored.model_id)


def state_dict(handle: RunHandle) -> Located:
    """The run's state dict (``state_dict/``), its manifest read."""
    manifest = layout.read_manifest(handle.store, layout.STATE_DICT_DIR)
    return Located(handle.run_id, handle.store, layout.STATE_DICT_DIR, manifest)
