"""Checking what a run has stored against its manifests, and finding what dead saves left behind.

A save that dies (``kill -9``, a lost connection) before its manifest is written leaves data
that no manifest lists, and on S3 possibly a multipart upload that was never completed. The
loader never sees either (a checkpoint without a manifest does not exist), but they take up
space: :func:`verify` reports them as *leftovers*, and :func:`clean_leftovers` removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, cast

from tracking import layout
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError, TrackingError
from tracking.manifest import Manifest
from tracking.run import RunHandle, open_run, tracking_server_errors
from tracking.selection import resolve_run_id
from tracking.storage import ArtifactStore, Buffer, BufferReader

# The folders whose files count only once a manifest in them lists them.
_MANIFEST_TOPS = (layout.STATE_DICT_DIR, layout.CHECKPOINTS_DIR)

UNCOMMITTED = "no manifest lists it"
UNFINISHED_UPLOAD = "unfinished upload"


@dataclass(frozen=True)
class Leftover:
    """A file a save left behind: uncommitted data, or an upload that never completed."""

    path: str  # relative to the run's artifact root
    kind: str  # UNCOMMITTED or UNFINISHED_UPLOAD

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


class VerifyReport(dict[str, str | None]):
    """Each committed file's path -> None if intact, else the problem; plus the run's ``leftovers``.

    Leftovers are not failures: nothing loads them, and :func:`clean_leftovers` removes them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.leftovers: list[Leftover] = []

    @property
    def failures(self) -> dict[str, str]:
        return {path: problem for path, problem in self.items() if problem is not None}


def verify(source: str, *, config: TrackingConfig | None = None) -> VerifyReport:
    """Check every stored file of a run against its manifest, and list what dead saves left behind."""
    store = open_run(resolve_run_id(source, config), config).store
    manifests = _manifests(store)
    report = VerifyReport()
    for folder, manifest in manifests.items():
        if isinstance(manifest, IntegrityError):
            report[layout.manifest_path(folder)] = str(manifest)
            continue
        for name, expected in manifest.files.items():
            path = f"{folder}/{name}"
            try:
                data = store.read(path, expected)
                report[path] = _load_problem(store, path, data, manifest.format)
            except (IntegrityError, NotFoundError) as exc:
                report[path] = str(exc)
    report.leftovers = _leftovers(store, manifests)
    return report


def _load_problem(store: ArtifactStore, path: str, data: Buffer, format: str) -> str | None:
    """Why intact bytes still would not load (None when they do): what a save must never commit."""
    import torch

    try:
        if format == "safetensors":
            from safetensors.torch import load as load_safetensors

            load_safetensors(bytes(data))
        else:
            torch.load(cast(BinaryIO, BufferReader(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        return (
            f"{store.owner}: {path} matches its manifest but does not load with torch.load(weights_only=True) "
            f"({' '.join(str(exc).split())[:300]}); load another checkpoint."
        )
    return None


def clean_leftovers(source: str, *, config: TrackingConfig | None = None, running: bool = True) -> list[str]:
    """Abort a run's unfinished uploads and delete data no manifest lists; what was removed.

    Committed checkpoints are never touched. A save in progress looks exactly like a dead one,
    so call this only when no process writes to the run any more; ``running=False`` refuses a
    run whose status is still RUNNING (as a killed run's stays).
    """
    handle = open_run(resolve_run_id(source, config), config)
    if not running:
        _refuse_running(handle)
    store = handle.store
    leftovers = _leftovers(store, _manifests(store))
    # Uploads first: completing one after its data was judged would bring the data back.
    aborted = {Leftover(path, UNFINISHED_UPLOAD) for path in store.abort_pending("")}
    for leftover in leftovers:
        if leftover.kind == UNCOMMITTED:
            store.delete(leftover.path)
    removed = [leftover for leftover in leftovers if leftover.kind == UNCOMMITTED] + sorted(
        aborted, key=lambda leftover: leftover.path
    )
    return [str(leftover) for leftover in removed]


def _refuse_running(handle: RunHandle) -> None:
    with tracking_server_errors(handle.run_id, "reading the run's status"):
        status = handle.client.get_run(handle.run_id).info.status
    if status == "RUNNING":
        raise TrackingError(
            f"run {handle.run_id} is still RUNNING: its leftovers may be a save in progress, and removing "
            "them would fail it. If no process writes to the run any more (it was killed), add --force."
        )


def _manifests(store: ArtifactStore) -> dict[str, Manifest | IntegrityError]:
    """Every committed folder's manifest, or the reason it cannot be read."""
    folders = [layout.checkpoint_dir(epoch) for epoch in layout.committed_epochs(store)]
    if layout.MANIFEST_FILE in store.list_files(layout.STATE_DICT_DIR):
        folders.insert(0, layout.STATE_DICT_DIR)
    found: dict[str, Manifest | IntegrityError] = {}
    for folder in folders:
        try:
            found[folder] = layout.read_manifest(store, folder)
        except IntegrityError as exc:
            found[folder] = exc
        except NotFoundError:
            continue  # deleted since the listing (retention): its data is a leftover now
    return found


def _leftovers(store: ArtifactStore, manifests: dict[str, Manifest | IntegrityError]) -> list[Leftover]:
    """Files below the manifest folders that no readable manifest lists, and unfinished uploads."""
    accounted: set[str] = set()
    unreadable: list[str] = []
    for folder, manifest in manifests.items():
        if isinstance(manifest, IntegrityError):
            unreadable.append(f"{folder}/")  # its files may be committed: leave them to the BAD line
            continue
        accounted.add(layout.manifest_path(folder))
        accounted.update(f"{folder}/{name}" for name in manifest.files)
    found: list[Leftover] = []
    for top in _MANIFEST_TOPS:
        for name in store.list_files(top):
            path = f"{top}/{name}"
            if path not in accounted and not path.startswith(tuple(unreadable)):
                found.append(Leftover(path, UNCOMMITTED))
    found += [Leftover(path, UNFINISHED_UPLOAD) for path in store.pending_uploads("")]
    return found
