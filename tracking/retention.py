"""Retention after the fact (``tracking gc``): delete a run's checkpoints outside the last N and the best K.

The rule and the deletions are a :class:`~tracking.checkpointer.Checkpointer`'s, the same as during training;
this module applies them to a run that is no longer (or never was) in this process, and reports what it did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypedDict, Unpack

from tracking import catalog, layout, note, registry
from tracking.checkpointer import Checkpointer
from tracking.config import TrackingConfig
from tracking.errors import StorageError, TrackingError, one_line
from tracking.run import RunHandle, open_run

_log = logging.getLogger(__name__)


class PruneOptions(TypedDict, total=False):
    """The keyword arguments of :func:`prune_report`, which :func:`prune` passes on as they are."""

    keep_last: int | None
    keep_best: int | None
    monitor: str | None
    mode: str | None
    dry_run: bool
    delete_registered: bool
    running: bool
    config: TrackingConfig | None


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune_report` deleted (with ``dry_run``, would delete), and what it kept because
    a registry version points at it (with those versions, ``name/version``)."""

    deleted: list[catalog.StoredCheckpoint]
    registered: list[tuple[catalog.StoredCheckpoint, list[str]]]


def prune(run_id: str, **options: Unpack[PruneOptions]) -> list[catalog.StoredCheckpoint]:
    """Retention after the fact: delete a run's checkpoints outside the last N and the best K.

    The rule is the :class:`~tracking.checkpointer.Checkpointer`'s (the latest checkpoint is always kept, the best tag
    moves to the best survivor first); ``monitor`` and ``mode`` default to what the run's tags
    record, else ``val_loss`` / ``min``. A checkpoint that a registry version points at is kept
    (a warning says so) unless ``delete_registered``; ``running=False`` refuses a run whose
    status is still RUNNING, whose trainer would point its tags at deleted checkpoints. Once some are
    deleted, a run description the library wrote is rewritten to list those that remain. Returns
    the checkpoints deleted (with ``dry_run``, those that would be), oldest first.
    """
    report = prune_report(run_id, **options)
    for checkpoint, versions in report.registered:
        _log.warning("%s", registered_line(checkpoint, versions))
    return report.deleted


def _relist(handle: RunHandle, remaining: dict[int, catalog.StoredCheckpoint], monitor: str) -> None:
    """Rewrite the run's description to list the checkpoints that remain, when the library wrote it: one request.

    ``handle.tags`` are the run's as retention left them (re-read before deleting, best moved).
    """
    text = handle.tags.get(note.NOTE_TAG, "")
    noted = {key: note.NotedCheckpoint(c.model_id, c.metrics) for key, c in remaining.items()}
    keyed_by = catalog.keyed_by(handle, remaining.values())
    monitor = handle.tags.get(layout.TAG_MONITOR) or monitor  # the run's own, which ranks its best
    relisted = note.relist(text, handle.run_id, noted, handle.tags, monitor=monitor, keyed_by=keyed_by)
    if relisted is None or relisted == text:
        return
    try:
        handle.set_tags({note.NOTE_TAG: relisted})
    except TrackingError as exc:  # the checkpoints are deleted all the same: the description is a view of them
        _log.warning(
            "run %s: the checkpoints are deleted, but the run's description still lists them (%s); the run's next "
            "checkpoint rewrites it, or edit it in the MLflow UI.",
            handle.run_id,
            one_line(exc)[:300],
        )


def registered_line(checkpoint: catalog.StoredCheckpoint, versions: list[str]) -> str:
    """Why a checkpoint outside the kept set stays: one line."""
    return (
        f"kept {layout.label(checkpoint.keyed_by, checkpoint.key)} ({checkpoint.model_id}): registry version "
        f"{', '.join(versions)} points at "
        "it; delete the version first, or pass --delete-registered (delete_registered=True)"
    )


def prune_report(
    run_id: str,
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    dry_run: bool = False,
    delete_registered: bool = False,
    running: bool = True,
    config: TrackingConfig | None = None,
) -> Pruned:
    """:func:`prune`, saying which checkpoints it kept because they are registered."""
    if keep_last is None and keep_best is None:
        raise ValueError("pass keep_last and/or keep_best: with neither, every checkpoint is kept")
    handle = open_run(run_id, config)
    if not running and not dry_run:
        from tracking.audit import refuse_running

        refuse_running(
            handle,
            "its trainer may point the run's latest/best tags at checkpoints deleted now. Stop it first, "
            "or add --force if no process writes to the run any more (it was killed).",
        )
    monitor = monitor or handle.tags.get(layout.TAG_MONITOR) or "val_loss"
    mode = mode or handle.tags.get(layout.TAG_MODE) or "min"
    pruner = Checkpointer(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, describe_run=False)
    committed = catalog.committed(handle)
    keys = f"{catalog.keyed_by(handle, committed.values())}s"
    kept = pruner._existing(handle)
    if keep_best is not None and any(value is None for value in kept.values()):
        missing = sorted(key for key, value in kept.items() if value is None)
        shared = set.intersection(*(set(checkpoint.metrics) for checkpoint in committed.values()))
        raise ValueError(
            f"run {run_id}: keep_best ranks checkpoints by {monitor!r}, which {keys} {missing} lack; pass "
            f"monitor= (--monitor) a metric they all have: {', '.join(sorted(shared)) or 'none'}."
        )
    if not kept:
        return Pruned([], [])
    if dry_run:
        doomed = sorted(set(kept) - pruner._retained(kept, latest=max(kept)))
        registered = {} if delete_registered else registry.versions_by_model(handle)
        return Pruned(
            [committed[e] for e in doomed if committed[e].model_id not in registered],
            [(committed[e], registered[committed[e].model_id]) for e in doomed if committed[e].model_id in registered],
        )
    done = pruner._apply_retention(handle, kept, latest=max(kept), delete_registered=delete_registered)
    if done.deleted:
        _relist(handle, {key: c for key, c in committed.items() if key not in done.deleted}, monitor)
    if done.failed:
        deleted = ", ".join(str(e) for e in done.deleted) or "none"
        failed = ", ".join(f"{e} ({model_id})" for e, (model_id, _) in sorted(done.failed.items()))
        first = one_line(next(iter(done.failed.values()))[1])[:300]
        raise StorageError(
            f"run {run_id}: could not delete the checkpoints of {keys} {failed} ({first}); deleted {keys}: "
            f"{deleted}. Run the same command again once the tracking server and the store answer."
        )
    return Pruned(
        [committed[e] for e in done.deleted],
        [(committed[e], versions) for e, (_, versions) in sorted(done.registered.items())],
    )
