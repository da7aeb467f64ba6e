"""Committing a checkpoint: data, then the manifest, then the run's pointer tags.

A checkpoint exists once its manifest is stored, and counts as saved once the tags moved;
every step here keeps that true for whoever reads the run meanwhile, a save killed at any
point included (see :func:`commit_checkpoint`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tracking import layout
from tracking.errors import NotFoundError, StorageError, TrackingError
from tracking.manifest import Manifest, StoredFile
from tracking.payload import TorchSave
from tracking.run import RunHandle
from tracking.saver import to_host
from tracking.storage import ArtifactStore


@dataclass(frozen=True)
class LoggedCheckpoint:
    """Where a checkpoint was committed, and its manifest."""

    run_id: str
    path: str
    manifest: Manifest


@dataclass
class CheckpointSnapshot:
    """Everything one checkpoint stores, taken from the live objects at one instant."""

    payload: dict[str, Any]
    manifest: Manifest
    monitor: str | None
    mode: str

    def to_host(self) -> CheckpointSnapshot:
        """A copy that owns its tensors, safe to upload while training goes on."""
        return replace(self, payload=to_host(self.payload))


def commit_checkpoint(handle: RunHandle, snapshot: CheckpointSnapshot) -> LoggedCheckpoint:
    """Store the checkpoint file, then its manifest, then move the run's tags.

    A checkpoint counts as saved once all three happened; when moving the tags fails, the
    manifest is undone, so the run never has a committed checkpoint its pointers ignore.

    Re-logging a committed epoch never touches the old checkpoint before the new one is
    committed: the new data goes to a staging name, and the new manifest (naming it)
    replaces the old one in one write. Only then is the data given its usual name again
    (copy, manifest, delete the staged file), each step leaving a manifest whose file
    exists; a save killed at any point leaves the old or the new checkpoint loadable.
    """
    manifest = snapshot.manifest
    assert manifest.epoch is not None
    store = handle.store
    folder = layout.checkpoint_dir(manifest.epoch)
    path = layout.manifest_path(folder)
    previous = _stored_manifest(store, path)
    # New data never goes to the file the committed manifest lists (usually checkpoint.pt;
    # the staged name when an earlier re-log died before renaming its data).
    name = layout.STAGED_CHECKPOINT_FILE if layout.CHECKPOINT_FILE in _listed(previous) else layout.CHECKPOINT_FILE
    stored = store.write(f"{folder}/{name}", TorchSave(snapshot.payload))
    manifest.files = {name: stored}
    store.write_bytes(path, manifest.to_json())
    try:
        # Compare with the run's tags as stored now, not as read when the save began: another
        # writer may have moved them since, and latest must never move backwards, nor best
        # to a worse checkpoint.
        handle.refresh_tags()
        tags = _pointer_tags(handle.tags, folder, manifest, snapshot.monitor, snapshot.mode)
        if tags:
            handle.set_tags(tags)
    except StorageError as exc:
        if previous is None:
            store.delete(path)
        else:
            store.write_bytes(path, previous)  # the old checkpoint's data was never touched
        raise StorageError(
            f"{exc} The checkpoint of epoch {manifest.epoch} was not committed (its manifest was undone, "
            "the run's latest/best tags are unchanged); save it again once the tracking server answers."
        ) from exc
    if name == layout.STAGED_CHECKPOINT_FILE:
        _unstage(store, folder, manifest, stored)
    elif previous is not None:
        store.delete(f"{folder}/{layout.STAGED_CHECKPOINT_FILE}")  # what the dead re-log had staged
    return LoggedCheckpoint(handle.run_id, folder, manifest)


def _stored_manifest(store: ArtifactStore, path: str) -> bytes | None:
    try:
        return bytes(store.read(path))
    except NotFoundError:
        return None


def _listed(manifest: bytes | None) -> set[str]:
    """The file names a stored manifest lists (none when there is none, or it cannot be read)."""
    if manifest is None:
        return set()
    try:
        files = json.loads(manifest).get("files")
    except (ValueError, AttributeError, RecursionError):
        return set()
    return set(files) if isinstance(files, dict) else set()


def _unstage(store: ArtifactStore, folder: str, manifest: Manifest, stored: StoredFile) -> None:
    """Give a re-logged checkpoint's data its usual name, for users who open ``checkpoint.pt`` directly."""
    try:
        store.copy(f"{folder}/{layout.STAGED_CHECKPOINT_FILE}", f"{folder}/{layout.CHECKPOINT_FILE}")
        manifest.files = {layout.CHECKPOINT_FILE: stored}
        store.write_bytes(layout.manifest_path(folder), manifest.to_json())
        store.delete(f"{folder}/{layout.STAGED_CHECKPOINT_FILE}")
    except TrackingError as exc:
        # Committed already, under the staged name its manifest lists: it loads as it is.
        warnings.warn(
            f"{store.owner}: {folder} is committed, but renaming its data to {layout.CHECKPOINT_FILE} failed "
            f"({exc}); it loads as it is, and `tracking verify --clean` removes what is left over.",
            RuntimeWarning,
            stacklevel=3,
        )


def _pointer_tags(
    tags: Mapping[str, str], folder: str, manifest: Manifest, monitor: str | None, mode: str
) -> dict[str, str]:
    """The pointer tags to move for a newly committed checkpoint, given the run's current tags."""
    assert manifest.epoch is not None
    out = {}
    latest = layout.epoch_of(tags.get(layout.TAG_LATEST, ""))
    if latest is None or manifest.epoch >= latest:
        out[layout.TAG_LATEST] = folder
    if monitor is not None:
        value = manifest.metrics[monitor]
        if layout.is_better(value, _recorded_best(tags, monitor), mode):
            out.update(
                {
                    layout.TAG_BEST: folder,
                    layout.TAG_BEST_VALUE: repr(value),
                    layout.TAG_MONITOR: monitor,
                    layout.TAG_MODE: mode,
                }
            )
    return out


def _recorded_best(tags: Mapping[str, str], monitor: str) -> float | None:
    """The best value the run's tags record for ``monitor``; None when there is none to beat."""
    if tags.get(layout.TAG_MONITOR) != monitor or layout.TAG_BEST_VALUE not in tags:
        return None
    raw = tags[layout.TAG_BEST_VALUE]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        # The writer only records finite metrics, so this tag was edited or damaged. Refusing to
        # save over it would lose the checkpoint; treating it as "nothing to beat" only lets this
        # checkpoint become best, which the warning says.
        warnings.warn(
            f"run tag {layout.TAG_BEST_VALUE}={str(raw)[:200]!r} is not a finite number; treating the run as "
            f"having no best {monitor!r} yet, so this checkpoint becomes best.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return value
