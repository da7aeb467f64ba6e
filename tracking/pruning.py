"""Pruning a run after the fact (``tracking gc``): :func:`prune` applies a
:class:`~tracking.retention.RetentionPolicy`'s rule (the last N and best K kept) to a run that is no
longer (or never was) in this process, and reports what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from tracking import catalog, layout, note, registry
from tracking.config import TrackingConfig
from tracking.errors import StorageError, TrackingError, one_line
from tracking.output import agree
from tracking.retention import RetentionPolicy
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
    """What :func:`prune_report` deleted (with ``dry_run``, would delete), what it kept because
    a registry version points at it (with those versions, ``name/version``), and what it failed to delete."""

    deleted: list[catalog.StoredCheckpoint]
    registered: list[tuple[catalog.StoredCheckpoint, list[str]]]
    needs_force: bool = False  # a dry run of a RUNNING run with running=False: deleting would be refused
    best_moved: BestMoved | None = None  # the run's best checkpoint is among those deleted
    failed: list[catalog.StoredCheckpoint] = field(default_factory=list)  # still there: the store or server failed
    error: StorageError | None = None  # why they failed, naming those deleted all the same: prune() raises it


@dataclass(frozen=True)
class BestMoved:
    """The run's best checkpoint, deleted by retention, and the survivor its best tag moves to (ranked by
    ``monitor``, which may differ from the run's ``was_monitor``); ``to`` is None when no survivor has ``monitor``."""

    deleted: catalog.StoredCheckpoint
    to: catalog.StoredCheckpoint | None
    monitor: str
    was_monitor: str | None


def prune(run_id: str, **options: Unpack[PruneOptions]) -> list[catalog.StoredCheckpoint]:
    """Retention after the fact: delete a run's checkpoints outside the last N and the best K.

    The rule is the :class:`~tracking.checkpointer.Checkpointer`'s (the latest checkpoint is always kept, the best tag
    moves to the best survivor first); ``monitor`` and ``mode`` default to what the run's tags
    record, else ``val_loss`` / ``min``; a ``monitor`` other than the run's needs its ``mode``, and a ``mode``
    contradicting the run's for the run's own metric is refused (ValueError: either would keep the worst). A
    checkpoint that a registry version points at is kept (a warning says so) unless ``delete_registered``;
    ``running=False`` refuses a run whose status is still RUNNING, whose trainer would point its tags at deleted
    checkpoints. Once some are deleted, a run description the library wrote is rewritten to list those that
    remain. Returns the checkpoints deleted (with ``dry_run``, those that would be), oldest first.
    """
    report = prune_report(run_id, **options)
    for checkpoint, versions in report.registered:
        _log.warning("%s", registered_line(checkpoint, versions))
    if report.error is not None:
        raise report.error
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
        f"kept {layout.label(checkpoint.keyed_by, checkpoint.key)} ({checkpoint.model_id}): "
        f"{registry.versions_point(versions)} at it; delete {registry.those_versions(versions)} "
        "first, or pass --delete-registered (delete_registered=True)"
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
    """:func:`prune`, saying which checkpoints it kept because they are registered; what it failed to delete is in
    the report's ``failed`` and ``error`` rather than raised, beside what it deleted all the same."""
    if keep_last is None and keep_best is None:
        raise ValueError("pass keep_last and/or keep_best: with neither, every checkpoint is kept")
    handle = open_run(run_id, config)
    needs_force = False
    if not running:
        from tracking.audit import is_running, refuse_running

        if dry_run:  # it lists what it would delete all the same, and says so
            needs_force = is_running(handle)
        else:
            refuse_running(
                handle,
                "its trainer may point the run's latest/best tags at checkpoints deleted now. Stop it first, "
                "or add --force if no process writes to the run any more (it was killed).",
            )
    monitor = monitor or handle.tags.get(layout.TAG_MONITOR) or "val_loss"
    committed = catalog.committed(handle)
    key_name = catalog.keyed_by(handle, committed.values())
    keys = f"{key_name}s"
    missing = sorted(key for key, checkpoint in committed.items() if monitor not in checkpoint.metrics)
    if keep_best is not None and missing:
        shared = set.intersection(*(set(checkpoint.metrics) for checkpoint in committed.values()))
        raise ValueError(
            f"run {run_id}: keep_best ranks checkpoints by {monitor!r}, which "
            f"{agree(len(missing), f'{key_name} {missing} lacks', f'{keys} {missing} lack')}; pass "
            f"monitor= (--monitor) a metric they all have: {', '.join(sorted(shared)) or 'none'}."
        )
    mode = _mode(run_id, handle.tags, monitor, mode)
    policy = RetentionPolicy(keep_last, keep_best, monitor, mode)
    kept = policy.read(handle)
    if not kept:
        return Pruned([], [], needs_force)
    policy.find_torn(handle, latest=max(kept))
    retained = policy.retained(kept, latest=max(kept))
    # Where the best tag goes if its checkpoint is deleted: to the best survivor, as policy.apply moves it.
    survivors = layout.best_first({key: kept[key] for key in retained}, mode)
    run_best = handle.tags.get(layout.TAG_BEST)

    def best_moved(deleted: list[int]) -> BestMoved | None:
        best = next((committed[key] for key in deleted if committed[key].model_id == run_best), None)
        if best is None:
            return None
        to = committed[survivors[0]] if survivors else None
        return BestMoved(best, to, monitor, handle.tags.get(layout.TAG_MONITOR))

    if dry_run:
        deleting, registered = policy.split(handle, sorted(set(kept) - retained), delete_registered=delete_registered)
        return Pruned(
            [committed[e] for e in deleting],
            [(committed[e], versions) for e, versions in sorted(registered.items())],
            needs_force,
            best_moved(deleting),
        )
    done = policy.apply(handle, latest=max(kept), delete_registered=delete_registered)
    if done.deleted:
        _relist(handle, {key: c for key, c in committed.items() if key not in done.deleted}, monitor)
    error = None
    if done.failed:
        deleted = ", ".join(str(e) for e in done.deleted) or "none"
        failed = ", ".join(f"{e} ({model_id})" for e, (model_id, _) in sorted(done.failed.items()))
        first = one_line(next(iter(done.failed.values()))[1])[:300]
        undeleted = agree(len(done.failed), f"checkpoint of {key_name}", f"checkpoints of {keys}")
        error = StorageError(
            f"run {run_id}: could not delete the {undeleted} {failed} ({first}); deleted {keys}: "
            f"{deleted}. Run the same command again once the tracking server and the store answer."
        )
    return Pruned(
        [committed[e] for e in done.deleted],
        [(committed[e], versions) for e, (_, versions) in sorted(done.registered.items())],
        best_moved=best_moved(done.deleted),
        failed=[committed[e] for e in sorted(done.failed)],
        error=error,
    )


def _mode(run_id: str, tags: Mapping[str, str], monitor: str, mode: str | None) -> str:
    """How ``monitor`` ranks a run's checkpoints for :func:`prune_report`: ``mode`` as given, else as the run records.

    The run's mode tag is how its own monitored metric ranks, and says nothing of another: ``val_loss``'s
    ``min`` would keep the worst ``val_acc`` and delete the best. So a ``monitor`` other than the run's needs its
    ``mode``, and a ``mode`` contradicting the run's for the run's own metric is refused: either would delete the
    checkpoints the run counts best, and move its best tag to one it counts worse.
    """
    recorded = tags.get(layout.TAG_MONITOR) or None
    recorded_mode = tags.get(layout.TAG_MODE) if tags.get(layout.TAG_MODE) in layout.MODES else None
    if recorded is None:
        return mode or "min"  # no best recorded: ranked as a Checkpointer ranks by default
    if monitor == recorded:
        if mode is not None and recorded_mode is not None and mode != recorded_mode:
            raise ValueError(
                f"run {run_id} ranks {monitor!r} by {recorded_mode} (its tag {layout.TAG_MODE}); mode={mode!r} "
                f"(--mode {mode}) would keep the checkpoints it counts worst and move its best tag to one of them. "
                f"Leave mode out, or if the run's mode is wrong, set the tag {layout.TAG_MODE} to {mode} in the "
                "MLflow UI first."
            )
        return mode or recorded_mode or "min"
    if mode is None:
        raise ValueError(
            f"run {run_id}: pass mode= (--mode) 'min' or 'max' to rank by {monitor!r}: the run's mode "
            f"({recorded_mode or 'min'}) ranks its own metric {recorded!r}, and a wrong guess would delete the "
            f"best checkpoints by {monitor!r}."
        )
    return mode


def best_moved_line(moved: BestMoved, *, dry_run: bool) -> str:
    """What deleting the run's best checkpoint does to its best tag: one line."""
    deleted = moved.deleted
    line = (
        f"the run's best checkpoint, {layout.label(deleted.keyed_by, deleted.key)} ({deleted.model_id}"
        + (
            f", {moved.was_monitor}={deleted.metrics[moved.was_monitor]:.4g}"
            if moved.was_monitor in deleted.metrics
            else ""
        )
        + f"), {'would be' if dry_run else 'was'} deleted"
    )
    if moved.to is None:
        return f"{line}; no checkpoint left has {moved.monitor} to take its place as best"
    to = moved.to
    line += (
        f": best {'would move' if dry_run else 'moved'} to {layout.label(to.keyed_by, to.key)} ({to.model_id}, "
        f"{moved.monitor}={to.metrics[moved.monitor]:.4g})"
    )
    if moved.was_monitor and moved.was_monitor != moved.monitor:
        line += f", ranked by {moved.monitor} instead of {moved.was_monitor} from then on"
    return line
