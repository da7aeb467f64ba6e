"""Committing a checkpoint: its logged model, its data, its manifest, READY, then the run's tags.

A checkpoint exists once its manifest is stored and its logged model is READY, and counts
as saved once the run's pointer tags moved; every step keeps that true for whoever reads
the run meanwhile, a save killed at any point included (see :func:`commit_checkpoint`).
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from tracking import catalog, layout, replacement
from tracking.catalog import LoggedCheckpoint, StoredCheckpoint
from tracking.deadline import Deadline, Overdue
from tracking.errors import StorageError, TrackingError
from tracking.manifest import Manifest, StoredFile
from tracking.payload import TorchSave
from tracking.run import RunHandle, tracking_server_errors
from tracking.saver import to_host


@dataclass
class CheckpointSnapshot:
    """Everything one checkpoint stores, taken from the live objects at one instant.

    ``rank_state`` is this rank's own part (its RNG and data-sampler states, say): the
    checkpoint stores every rank's, and a resume gives each rank back its own. ``chart_step``
    is the step its metrics are logged at in the run's and the model's charts; None: its epoch.
    """

    payload: dict[str, Any]
    manifest: Manifest
    monitor: str | None
    mode: str
    rank_state: Any = None
    chart_step: int | None = None

    def to_host(self) -> CheckpointSnapshot:
        """A copy that owns its tensors, safe to upload while training goes on."""
        return replace(self, payload=to_host(self.payload), rank_state=to_host(self.rank_state))


# Given the new checkpoint's model ID and the run's tags as they will be, more run tags to set
# in the same request (the Checkpointer's run description).
Describe = Callable[[str, Mapping[str, str]], dict[str, str]]


def commit_checkpoint(
    handle: RunHandle, snapshot: CheckpointSnapshot, describe: Describe | None = None
) -> LoggedCheckpoint:
    """Store a checkpoint as a new logged model of the run, then point the run's tags at it.

    Order: the logged model (PENDING), ``checkpoint.pt``, ``manifest.json``, READY, then one
    request that moves the run's latest/best tags and logs the metrics against the model.
    A save that fails on the way ends FAILED with its files removed, and the tags unchanged;
    one killed on the way leaves a PENDING model that no reader lists and ``tracking verify
    --clean`` removes. Re-logging an epoch makes a new model; the one it replaces is deleted
    only after the new one is committed.
    """
    checkpoint = catalog.create(handle, snapshot.manifest)

    def write_files() -> dict[str, StoredFile]:
        return {layout.CHECKPOINT_FILE: checkpoint.store.write(layout.CHECKPOINT_FILE, TorchSave(snapshot.payload))}

    return commit_files(handle, checkpoint, snapshot, write_files, describe)


def commit_local_files(
    handle: RunHandle,
    manifest: Manifest,
    files: Mapping[str, Path],
    *,
    monitor: str | None = None,
    mode: str = "min",
    describe: Describe | None = None,
    chart_step: int | None = None,
) -> LoggedCheckpoint:
    """Commit files a framework already saved on local disk (``stored name -> local path``) as a checkpoint.

    The same commit as :func:`commit_checkpoint`'s: a new logged model, each file (size and sha256
    recorded as it streams), the manifest listing them last, READY, the run's tags. ``chart_step``
    is the step the checkpoint's metrics are charted at (None: its epoch): the framework's own
    MLflow logger logs the same keys to the run, at its own steps, and one chart must not mix two.
    """
    # Opened before anything is logged, and held open: a file the framework removes meanwhile (its own
    # retention) still reads whole, and a file already gone is said as such, not as a failed transfer.
    with ExitStack() as opened:
        sources = {name: opened.enter_context(_open_saved(handle, manifest, path)) for name, path in files.items()}
        checkpoint = catalog.create(handle, manifest)
        snapshot = CheckpointSnapshot(payload={}, manifest=manifest, monitor=monitor, mode=mode, chart_step=chart_step)

        def write_files() -> dict[str, StoredFile]:
            return {name: checkpoint.store.write(name, _copy_of(source)) for name, source in sources.items()}

        return commit_files(handle, checkpoint, snapshot, write_files, describe)


def _open_saved(handle: RunHandle, manifest: Manifest, path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise TrackingError(
            f"run {handle.run_id}: {path}, saved as {layout.label(manifest.keyed_by, manifest.key)}, cannot be "
            f"read to upload ({exc.strerror or exc}); nothing was logged for it and the run's checkpoints are "
            "unchanged: check that nothing else removes or rewrites the training's checkpoint folder, then save again."
        ) from exc


def _copy_of(source: BinaryIO) -> Callable[[Any], None]:
    def produce(stream: Any) -> None:
        shutil.copyfileobj(source, stream, 8 * 1024 * 1024)

    return produce


def commit_files(
    handle: RunHandle,
    checkpoint: StoredCheckpoint,
    snapshot: CheckpointSnapshot,
    write_files: Callable[[], dict[str, StoredFile]],
    describe: Describe | None = None,
) -> LoggedCheckpoint:
    """The commit of the PENDING logged model ``checkpoint`` once ``write_files`` stored its data files.

    ``write_files`` returns each file it stored (a sharded save's: every rank's); then the
    manifest listing them, READY, and the run's tags, as :func:`commit_checkpoint` says.
    """
    manifest = snapshot.manifest
    assert manifest.key is not None
    ready = stored = tagging = False
    replaced: set[str] = set()
    step = time.monotonic()  # when the request under way began: a failure's follow-ups share its deadline
    try:
        manifest.files = write_files()
        step = time.monotonic()
        checkpoint.store.write_bytes(layout.MANIFEST_FILE, manifest.to_json())
        stored = True
        step = time.monotonic()
        catalog.set_status(handle, checkpoint, catalog.READY)
        ready = True
        step = time.monotonic()
        # Compare with the run's tags as stored now, not as read when the save began: another
        # writer may have moved them since, and latest must never move backwards, nor best
        # to a worse checkpoint.
        handle.refresh_tags()
        replaced, latest = replacement.replaced(handle, manifest, checkpoint.model_id)
        replaced |= replacement.left_by_a_killed_save(handle, manifest, checkpoint.model_id)
        survivor = None
        if snapshot.monitor is not None and handle.tags.get(layout.TAG_BEST) in replaced:
            survivor = replacement.best_survivor(
                handle, replaced | {checkpoint.model_id}, snapshot.monitor, snapshot.mode
            )
        tags = _pointer_tags(
            handle.tags, checkpoint, manifest, snapshot.monitor, snapshot.mode, replaced, latest, survivor
        )
        if describe is not None:
            tags.update(describe(checkpoint.model_id, {**handle.tags, **tags}))
        step, tagging = time.monotonic(), True
        handle.set_tags(tags, _model_metrics(checkpoint, manifest, snapshot.chart_step))
    except Exception as exc:
        # One deadline for the save: the follow-ups below (did the tag request go through? delete the
        # files, mark FAILED) share what remains of the failed request's bound instead of each waiting
        # a full timeout of their own on a server that went silent.
        deadline = Deadline(handle.config.operation_bound(), start=step)
        # After a store failure before the manifest, do not wait on the store again to delete the
        # files (a silent store would double the time to fail; verify --clean does). Once the
        # manifest is stored the store answered, and the manifest must go whatever failed next:
        # a model ID with a manifest loads, whatever its status says.
        delete = stored or not isinstance(exc, StorageError)
        files = list(manifest.files) or [layout.CHECKPOINT_FILE]
        committed = None
        if tagging:
            try:
                committed = deadline.wait_for(lambda: _tags_naming(handle, checkpoint.model_id))
            except Overdue:
                pass  # as when the check fails: not committed (the check goes on, unheard, in its thread)
        if committed is None:
            try:
                failed = deadline.wait_for(lambda: _abandon(handle, checkpoint, files, delete=delete))
                state = (
                    "is marked FAILED"
                    if failed
                    else f"is left {'READY' if ready else 'PENDING'} without a manifest: nothing loads it, and "
                    "`tracking verify --clean` removes it"
                )
            except Overdue:
                state = "could not be marked FAILED in time either: `tracking verify --clean` removes what it left"
            if not isinstance(exc, StorageError):
                raise
            raise StorageError(
                f"{exc} The checkpoint of {layout.label(manifest.keyed_by, manifest.key)} was not committed (its "
                f"logged model {checkpoint.model_id} {state}; the run's latest/best tags are unchanged); save it "
                "again once the store and the tracking server answer."
            ) from exc
        # Else the tag request was applied and only its answer lost: the checkpoint is committed.
        handle.tags = committed
    if replaced:
        replacement.delete_replaced(handle, replaced)
    return LoggedCheckpoint(handle.run_id, checkpoint.name, manifest, checkpoint.model_id, checkpoint.artifact_uri)


def _model_metrics(checkpoint: StoredCheckpoint, manifest: Manifest, chart_step: int | None) -> list[Any]:
    """The checkpoint's metrics as MLflow metrics of its logged model, at step ``chart_step``, else its epoch.

    MLflow logs them to the run as well, so the run's charts and the model's agree. Epoch is the
    step the pipelines chart by (the global optimizer step stays in the manifest and the model's
    params); a framework's integration charts at the step its framework's MLflow logger uses.
    """
    from mlflow.entities import Metric

    assert manifest.epoch is not None
    step = manifest.epoch if chart_step is None else chart_step
    now = int(time.time() * 1000)
    return [Metric(k, v, now, step, model_id=checkpoint.model_id) for k, v in manifest.metrics.items()]


def _tags_naming(handle: RunHandle, model_id: str) -> dict[str, str] | None:
    """The run's tags, read again, when they name ``model_id``: a failed tag request may have been applied."""
    try:
        with tracking_server_errors(handle.run_id, "reading the run's tags"):
            tags = dict(handle.client.get_run(handle.run_id).data.tags)
    except TrackingError:
        return None
    return tags if model_id in (tags.get(layout.TAG_LATEST), tags.get(layout.TAG_BEST)) else None


def _abandon(handle: RunHandle, checkpoint: StoredCheckpoint, files: list[str], delete: bool = True) -> bool:
    """Undo a save that failed: the manifest first (the checkpoint stops existing), its ``files``, then FAILED.

    True when the model could be marked FAILED.
    """
    if delete:
        try:
            checkpoint.store.delete(layout.MANIFEST_FILE)
            for name in files:
                checkpoint.store.delete(name)
        except TrackingError:
            pass  # readers need the manifest, and verify --clean finds what stays
    try:
        catalog.set_status(handle, checkpoint, catalog.FAILED)
    except TrackingError:
        return False  # the server that failed the save may refuse this too: the manifest is gone either way
    return True


def _pointer_tags(
    tags: Mapping[str, str],
    checkpoint: StoredCheckpoint,
    manifest: Manifest,
    monitor: str | None,
    mode: str,
    replaced: set[str],
    latest: int | None,
    survivor: tuple[str, float] | None = None,
) -> dict[str, str]:
    """The pointer tags to move for a newly committed checkpoint, given the run's current tags and latest epoch.

    When the best tag names a model this one replaces, ``survivor`` is the best of the run's other
    checkpoints (model ID, value): best goes to whichever of the two is better.
    """
    assert manifest.key is not None
    out = {}
    if latest is None or manifest.key >= latest:
        out[layout.TAG_LATEST] = checkpoint.model_id
        out[layout.latest_key_tag(manifest.keyed_by)] = str(manifest.key)
    if monitor is not None:
        value = manifest.metrics[monitor]
        if tags.get(layout.TAG_BEST) in replaced:
            recorded = survivor[1] if survivor is not None else None
            if survivor is not None and not layout.is_better(value, recorded, mode):
                out.update(
                    {
                        layout.TAG_BEST: survivor[0],
                        layout.TAG_BEST_VALUE: repr(survivor[1]),
                        layout.TAG_MONITOR: monitor,
                        layout.TAG_MODE: mode,
                    }
                )
        else:
            recorded = _recorded_best(tags, monitor)
        if layout.is_better(value, recorded, mode):
            out.update(
                {
                    layout.TAG_BEST: checkpoint.model_id,
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
