"""Retention: keep a run's last N and best K checkpoints, and delete the rest.

A :class:`~tracking.checkpointer.Checkpointer` applies its :class:`RetentionPolicy` right after each save
commits; :func:`prune` (``tracking gc``) applies the same rule to a run that is no longer (or never was)
in this process, and reports what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from tracking import catalog, layout, note, registry
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError, StorageError, TrackingError, one_line
from tracking.output import agree
from tracking.run import RunHandle, open_run
from tracking.storage import open_store

_log = logging.getLogger(__name__)


@dataclass
class Retention:
    """What one retention pass did, by key (epoch or step): deleted, kept because registered, or failed to delete."""

    deleted: list[int] = field(default_factory=list)
    registered: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # -> (model ID, versions)
    failed: dict[int, tuple[str, TrackingError]] = field(default_factory=dict)  # -> (model ID, error)
    keyed_by: str = layout.EPOCH

    def warnings(self, run_id: str) -> list[str]:
        """One line for what failed, one per registered checkpoint kept."""
        lines = [
            f"run {run_id}: retention keeps {layout.label(self.keyed_by, key)} ({model_id}) because "
            f"{registry.versions_point(versions)} at it; delete {registry.those_versions(versions)} first, or the "
            "checkpoint with `tracking gc --delete-registered`."
            for key, (model_id, versions) in sorted(self.registered.items())
        ]
        if self.failed:
            what = ", ".join(
                f"{layout.label(self.keyed_by, key)} ({model_id})" for key, (model_id, _) in sorted(self.failed.items())
            )
            first = one_line(next(iter(self.failed.values()))[1])[:300]
            lines.append(
                f"run {run_id}: retention could not delete {what} ({first}); the checkpoint just saved is "
                "committed, and the next save retries the deletion."
            )
        return lines


class RetentionPolicy:
    """Keep the last ``keep_last`` and the best ``keep_best`` (by ``monitor``, ``mode``) of a run's checkpoints.

    It holds the run's committed checkpoints as this process knows them: read from the run once
    (:meth:`read`), then added to as checkpoints commit (:meth:`add`). A
    :class:`~tracking.checkpointer.Checkpointer` applies it right after each save; :func:`prune`, after the fact.
    """

    def __init__(self, keep_last: int | None, keep_best: int | None, monitor: str, mode: str) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if mode not in layout.MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        # key (epoch, or step) -> monitored value (None when the checkpoint lacks it), for retention, and
        # key -> (model ID, artifact location), to delete what falls out. None until read from the run.
        self.kept: dict[int, float | None] | None = None
        self._models: dict[int, tuple[str, str]] = {}
        # key -> model ID and metrics of every committed checkpoint, for the run's description.
        self.noted: dict[int, note.NotedCheckpoint] = {}
        # Keys of READY models whose manifest is gone (a deletion that died after it): no checkpoint, so none of
        # the last N or best K, and deleted again. Found among those read from the run (_unread) as they would
        # be kept: one this process committed has its manifest.
        self.torn: set[int] = set()
        self._unread: set[int] = set()

    @property
    def retains(self) -> bool:
        """Whether it deletes anything: with neither ``keep_last`` nor ``keep_best``, everything is kept."""
        return self.keep_last is not None or self.keep_best is not None

    def read(
        self, handle: RunHandle, listed: list[catalog.StoredCheckpoint] | None = None, *, describe: bool = False
    ) -> dict[int, float | None]:
        """The run's committed checkpoints (key -> monitored value), read once: a resumed run's earlier ones count.

        ``listed``: the run's checkpoints, when just searched. Not read when nothing needs them: a
        policy that retains nothing, for a writer that does not ``describe`` the run either.
        """
        if self.kept is None:
            self.kept = {}
            if self.retains or describe:
                committed = catalog.committed(handle) if listed is None else catalog.current(handle, listed)
                for key, stored in committed.items():
                    self.add(key, stored.model_id, stored.artifact_uri, stored.metrics)
                self._unread = set(committed)
        return self.kept

    def add(self, key: int, model_id: str, artifact_uri: str, metrics: Mapping[str, float]) -> None:
        """Count a checkpoint just committed (or found committed) at ``key``."""
        assert self.kept is not None, "read() the run first"
        self.kept[key] = metrics.get(self.monitor)
        self._models[key] = (model_id, artifact_uri)
        self.noted[key] = note.NotedCheckpoint(model_id, dict(metrics))
        self.torn.discard(key)
        self._unread.discard(key)

    def retained(self, kept: Mapping[int, float | None], latest: int) -> set[int]:
        """The keys retention keeps of ``kept`` (key -> monitored value) once ``latest`` is committed."""
        keep = {latest}
        candidates = {key: value for key, value in kept.items() if key not in self.torn}
        if self.keep_last is not None:
            keep.update(sorted(candidates)[-self.keep_last :])
        if self.keep_best is not None:
            keep.update(layout.best_first(candidates, self.mode)[: self.keep_best])
        return keep

    def find_torn(self, handle: RunHandle, latest: int) -> None:
        """Add to ``torn`` the checkpoints read from the run that it would keep and that lost their manifest.

        Kept, such a model (its deletion died after the manifest; a policy that keeps more, or ranks otherwise,
        would keep it) takes the place of a checkpoint that loads: the best one by the ranking, deleted. Only
        what it would keep is read, each once: a few manifests, not the run's. One that cannot be read now
        counts as there, and is read again by the next pass.
        """
        assert self.kept is not None, "read() the run first"
        while unread := self.retained(self.kept, latest) & self._unread:
            for key in unread:
                model_id, artifact_uri = self._models[key]
                store = open_store(artifact_uri, handle.config, owner=f"run {handle.run_id}, {model_id}")
                try:
                    layout.read_manifest(store)
                except NotFoundError:
                    self.torn.add(key)
                except IntegrityError:
                    pass  # there, but damaged: left as it is for `tracking verify` to report
                except TrackingError:
                    continue  # the store failed: kept as if there, and read again next pass
                self._unread.discard(key)
            if not self.torn & unread:
                return  # none dropped out: the kept set stands (one the store failed to read is read next pass)

    def apply(self, handle: RunHandle, latest: int, *, delete_registered: bool = False) -> Retention:
        """Delete what falls outside the kept set once ``latest`` is committed; what cannot be deleted now stays.

        A checkpoint that fails to delete (a stalled server) stays in the kept set, so the next pass
        retries it; one that a registry version points at is kept (and dropped from the policy, so
        it is reported once) unless ``delete_registered``. The checkpoint just committed is never
        at stake: nothing here raises for a deletion.
        """
        kept = self.read(handle)
        done = Retention(keyed_by=layout.keyed_by_of(handle.tags) or layout.EPOCH)
        if not self.retains:
            return done
        self.find_torn(handle, latest)
        keep = self.retained(kept, latest)
        doomed = sorted(set(kept) - keep)
        if not doomed:
            return done
        try:
            # The run's tags as they are now: another writer may have moved best since this one committed.
            handle.refresh_tags()
            deleting, registered = self.split(handle, doomed, delete_registered=delete_registered)
            self._repoint_best(handle, kept, keep, deleting)
        except TrackingError as exc:
            # Without the run's tags, deleting could leave best naming a missing checkpoint: retry next pass.
            done.failed = {key: (self._models[key][0], exc) for key in doomed}
            return done
        for key in doomed:
            model_id, artifact_uri = self._models[key]
            if key in registered:
                done.registered[key] = (model_id, registered[key])
            elif key not in deleting:
                continue  # the run's latest: kept in the policy, and at stake again once the tag moves on
            else:
                try:
                    catalog.delete(handle, model_id, artifact_uri)
                except TrackingError as exc:
                    done.failed[key] = (model_id, exc)
                    continue
                done.deleted.append(key)
            del kept[key]
            del self._models[key]
            self.noted.pop(key, None)
        return done

    def split(
        self, handle: RunHandle, doomed: list[int], *, delete_registered: bool
    ) -> tuple[list[int], dict[int, list[str]]]:
        """Of ``doomed`` (outside the kept set), the keys deleted, and those kept because registry versions point at
        them (key -> the versions): what :meth:`apply` does, and a dry run lists.

        The checkpoint the run's latest tag (``handle.tags``) names is neither: it stays, whatever its key. It is
        another writer's latest (of re-logged or newer checkpoints of its own), or the newest key's save died
        between READY and moving the tags, and deleting it would leave ``latest`` naming nothing.
        """
        registered = {} if delete_registered else registry.versions_by_model(handle)
        latest = handle.tags.get(layout.TAG_LATEST)
        models = {key: self._models[key][0] for key in doomed if self._models[key][0] != latest}
        deleting = [key for key, model_id in models.items() if model_id not in registered]
        return deleting, {key: registered[model_id] for key, model_id in models.items() if model_id in registered}

    def _repoint_best(
        self, handle: RunHandle, kept: Mapping[int, float | None], keep: set[int], doomed: list[int]
    ) -> None:
        """Before deleting (``doomed``) the checkpoint the best tag names, point the tag at the best survivor.

        Only then: the tag is the run's, and a survivor of this policy is no better than the run's
        best when another writer holds it (two Checkpointers on one run must not move best to worse).
        """
        if handle.tags.get(layout.TAG_BEST) not in {self._models[key][0] for key in doomed}:
            return
        ranked = layout.best_first({e: kept[e] for e in keep}, self.mode)
        if ranked:
            handle.set_tags(
                {
                    layout.TAG_BEST: self._models[ranked[0]][0],
                    layout.TAG_BEST_VALUE: repr(kept[ranked[0]]),
                    layout.TAG_MONITOR: self.monitor,
                    layout.TAG_MODE: self.mode,
                }
            )


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
