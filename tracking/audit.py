"""Checking what a run has stored against its manifests, and finding what dead saves left behind.

A save that dies (``kill -9``, a lost connection) before its checkpoint is committed leaves a
logged model that never became READY, data that no manifest lists, and on S3 possibly a
multipart upload that was never completed. No reader sees any of it (a checkpoint without a
manifest and a READY model does not exist), but it takes up space: :func:`verify` reports
it as *leftovers*, and :func:`clean_leftovers` removes it. So it does with a checkpoint whose deletion
died after its manifest (the deletion's first step): :func:`clean_leftovers` finishes that deletion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, cast

from tracking import catalog, layout
from tracking.catalog import StoredCheckpoint
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError, TrackingError, load_refusal
from tracking.located import missing_file
from tracking.manifest import Manifest
from tracking.registry import versions_by_model
from tracking.run import RunHandle, tracking_server_errors
from tracking.source import open_run_of, open_run_pinned, open_source
from tracking.storage import ArtifactStore, Buffer, BufferReader
from tracking.uri import parse_source

UNCOMMITTED = "no manifest lists it"
UNFINISHED_UPLOAD = "unfinished upload"
NOT_COMMITTED_MODEL = "a logged model whose save never committed"
UNFINISHED_DELETION = (
    "a deletion that did not finish: its manifest is deleted, its files and READY logged model not yet (retention, "
    "gc or a failed save's undoing died part way)"
)
REPLACED_MODEL = "replaced by a newer checkpoint of the same epoch (or step)"


@dataclass(frozen=True)
class Leftover:
    """What a save left behind: uncommitted data, an unfinished upload, or an uncommitted logged model."""

    path: str  # state_dict/<file>, or <checkpoint name> (<model ID>)[/<file>]
    kind: str

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


@dataclass
class _Part:
    """One manifest folder to check: the run's state_dict/, or a checkpoint's logged model."""

    label: str
    store: ArtifactStore
    folder: str
    manifest: Manifest | IntegrityError | None
    model: StoredCheckpoint | None = None
    leftover_kind: str | None = None  # set when the whole logged model is a leftover
    files: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


class VerifyReport(dict[str, str | None]):
    """Each committed file's path -> None if intact, else the problem; plus the run's ``leftovers``.

    Leftovers are not failures: nothing loads them, and :func:`clean_leftovers` removes them.
    ``checked`` says what: ``run <id>``, or the one checkpoint a ``models:/`` source names.
    """

    def __init__(self, run_id: str = "", model_id: str | None = None, checked: str = "") -> None:
        super().__init__()
        self.leftovers: list[Leftover] = []
        self.run_id = run_id
        self.model_id = model_id
        self.checked = checked

    @property
    def failures(self) -> dict[str, str]:
        return {path: problem for path, problem in self.items() if problem is not None}


def verify(source: str, *, config: TrackingConfig | None = None) -> VerifyReport:
    """Check every stored file of a run against its manifest, and list what dead saves left behind.

    A ``models:/`` source that names a checkpoint checks that checkpoint only (and what its folder
    holds beside it), even once its run is deleted, as ``tracking.load`` reads it then; any other source,
    its whole run.
    """
    try:
        handle, pinned = open_run_pinned(source, config)
    except NotFoundError:
        # A registered checkpoint outlives its run (deleted in the UI once training was done): it loads, so it
        # verifies, alone; what the run's other checkpoints left is no longer anyone's.
        model = _checkpoint_of_a_gone_run(source, config)
        if model is None:
            raise
        parts = [_model_part(model)]
        report = VerifyReport(model.run_id, model.model_id, f"{parts[0].label} of run {model.run_id}, which is deleted")
    else:
        parts = _parts(handle)
        own = [part for part in parts if part.model is not None and part.model.model_id == pinned]
        if own:
            parts = own
            report = VerifyReport(handle.run_id, pinned, f"{own[0].label} of run {handle.run_id}")
        else:  # a run, or a models:/ URI of something else than a checkpoint (a whole model): its run
            report = VerifyReport(handle.run_id, None, f"run {handle.run_id}")
    for part in parts:
        if part.leftover_kind is not None:
            continue
        if isinstance(part.manifest, IntegrityError):
            report[f"{part.label}/{layout.MANIFEST_FILE}"] = str(part.manifest)
            continue
        if part.manifest is None:
            continue  # a state dict whose save died before its manifest: its files are leftovers
        for name, expected in part.manifest.files.items():
            try:
                data = part.store.read(part.path(name), expected)
                report[f"{part.label}/{name}"] = _load_problem(part, name, data, part.manifest.format)
            except IntegrityError as exc:
                report[f"{part.label}/{name}"] = str(exc)
            except NotFoundError:
                missing = missing_file(report.run_id, part.label, name, part.store.describe(part.path(name)))
                report[f"{part.label}/{name}"] = str(missing)
    report.leftovers = _leftovers(parts)
    return report


def _load_problem(part: _Part, name: str, data: Buffer, format: str) -> str | None:
    """Why intact bytes still would not load (None when they do): what a save must never commit."""
    import torch

    from tracking.pretrained import STATE_FILES

    try:
        if format == "safetensors":
            from safetensors.torch import load as load_safetensors

            load_safetensors(bytes(data))
        elif format == "dcp":
            from tracking.parallel import dcp_index

            # Shards are raw tensor bytes and weights-only pickles that dcp.json places; its index must parse.
            if name == dcp_index.METADATA_FILE and isinstance(part.manifest, Manifest):
                sizes = {file: stored.size for file, stored in part.manifest.files.items()}
                dcp_index.from_json(bytes(data), sizes, where=f"{part.store.owner}: {name}")
        elif format == "transformers" and name.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            load_safetensors(bytes(data))
        elif format == "transformers" and name not in STATE_FILES:
            # Its config, its trainer state, the Trainer's own pickles: the sha256 is their check (never unpickled).
            return None
        else:
            torch.load(cast(BinaryIO, BufferReader(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        return (
            f"{part.store.owner}: {name} matches its manifest but does not load with torch.load(weights_only=True) "
            f"({load_refusal(exc)[:300]}); load another checkpoint."
        )
    return None


def clean_leftovers(source: str, *, config: TrackingConfig | None = None, running: bool = True) -> list[str]:
    """Abort a run's unfinished uploads, delete data no manifest lists and uncommitted logged models.

    Committed checkpoints are never touched. A save in progress looks exactly like a dead one,
    so call this only when no process writes to the run any more; ``running=False`` refuses a
    run whose status is still RUNNING (as a killed run's stays).
    """
    handle = open_run_of(source, config)
    if not running:
        refuse_running(
            handle,
            "its leftovers may be a save in progress, and removing them would fail it. If no process writes "
            "to the run any more (it was killed), add --force.",
        )
    parts = _parts(handle)
    leftovers = _leftovers(parts)
    removed: list[Leftover] = []
    for part in parts:
        # Uploads first: completing one after its data was judged would bring the data back.
        removed += [Leftover(f"{part.label}/{p}", UNFINISHED_UPLOAD) for p in part.store.abort_pending(part.folder)]
        if part.model is not None and part.leftover_kind is not None:
            catalog.delete(handle, part.model.model_id, part.model.artifact_uri)
    for leftover in leftovers:
        if leftover.kind == UNCOMMITTED:
            part_label, _, name = leftover.path.rpartition("/")
            part = next(p for p in parts if p.label == part_label)
            part.store.delete(part.path(name))
            removed.append(leftover)
        elif leftover.kind in (NOT_COMMITTED_MODEL, UNFINISHED_DELETION, REPLACED_MODEL):
            removed.append(leftover)
    return [str(leftover) for leftover in sorted(removed, key=lambda leftover: leftover.path)]


def refuse_running(handle: RunHandle, why: str) -> None:
    """A TrackingError when the run's status is still RUNNING: ``why`` says what changing it now risks."""
    if is_running(handle):
        raise TrackingError(f"run {handle.run_id} is still RUNNING: {why}")


def is_running(handle: RunHandle) -> bool:
    """Whether the run's status is still RUNNING: its trainer writes to it, or was killed."""
    with tracking_server_errors(handle.run_id, "reading the run's status"):
        return bool(handle.client.get_run(handle.run_id).info.status == "RUNNING")


def _parts(handle: RunHandle) -> list[_Part]:
    """The run's state dict folder and every checkpoint logged model, each with its manifest and files."""
    parts = []
    state_files = handle.store.list_files(layout.STATE_DICT_DIR)
    if state_files:
        part = _Part(
            layout.STATE_DICT_DIR, handle.store, layout.STATE_DICT_DIR, _manifest(handle.store, layout.STATE_DICT_DIR)
        )
        part.files = state_files
        parts.append(part)
    models = catalog.search(handle, status=None)
    kept: dict[int | None, str] = {e: m.model_id for e, m in catalog.current(handle, models).items()}
    registered: dict[str, list[str]] | None = None  # listed once, when a replaced model is found
    for model in models:
        part = _model_part(model)
        if part.leftover_kind is None and kept.get(model.key) != model.model_id:
            if registered is None:
                registered = versions_by_model(handle)
            if model.model_id not in registered:  # one a registry version loads stays a checkpoint
                part.leftover_kind = REPLACED_MODEL
        parts.append(part)
    return parts


def _model_part(model: StoredCheckpoint) -> _Part:
    """A checkpoint logged model with its files and manifest; a leftover when its save never committed."""
    part = _Part(f"{model.name} ({model.model_id})", model.store, "", None, model)
    part.files = model.store.list_files("")
    if model.status != catalog.READY:
        part.leftover_kind = NOT_COMMITTED_MODEL
    else:
        part.manifest = _manifest(model.store, "")
        if part.manifest is None:
            # READY, so it was committed, or its save failed after READY: the manifest going first is how a
            # deletion starts (retention's, gc's, a failed save undoing itself), and one died after that.
            part.leftover_kind = UNFINISHED_DELETION
    return part


def _checkpoint_of_a_gone_run(source: str, config: TrackingConfig | None) -> StoredCheckpoint | None:
    """The checkpoint a ``models:/`` source names when its run cannot be opened (deleted); None when it names none."""
    parsed = parse_source(source)
    if parsed.run_id is not None:
        return None
    try:
        _, pinned = open_source(source, parsed, config)
    except NotFoundError:  # no such model or version, or one that is no checkpoint: the first error says
        return None
    return pinned


def _manifest(store: ArtifactStore, folder: str) -> Manifest | IntegrityError | None:
    try:
        return layout.read_manifest(store, folder)
    except IntegrityError as exc:
        return exc
    except NotFoundError:
        return None


def _leftovers(parts: list[_Part]) -> list[Leftover]:
    """Uncommitted logged models, files that no readable manifest lists, and unfinished uploads."""
    found: list[Leftover] = []
    for part in parts:
        found += [Leftover(f"{part.label}/{p}", UNFINISHED_UPLOAD) for p in part.store.pending_uploads(part.folder)]
        if part.leftover_kind is not None:
            found.append(Leftover(part.label, part.leftover_kind))
            continue
        if isinstance(part.manifest, IntegrityError):
            continue  # its files may be committed: leave them to the BAD line
        listed = {layout.MANIFEST_FILE} | set(part.manifest.files if part.manifest else ())
        found += [Leftover(f"{part.label}/{name}", UNCOMMITTED) for name in part.files if name not in listed]
    return found
