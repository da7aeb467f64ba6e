"""Retention: keep a run's last N and best K checkpoints, and delete the rest.

A :class:`~tracking.checkpointer.Checkpointer` applies its :class:`RetentionPolicy` right after each save
commits; :func:`tracking.pruning.prune` (``tracking gc``) applies the same rule to a run that is no longer (or
never was) in this process, and reports what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from tracking import catalog, layout, note, registry
from tracking.errors import IntegrityError, NotFoundError, TrackingError, one_line
from tracking.run import RunHandle
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
