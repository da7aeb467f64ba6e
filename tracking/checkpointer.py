"""A training loop's checkpoint policy: when to save, and which checkpoints to keep."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn

import torch
from torch import nn

from tracking import catalog, layout, note, registry
from tracking.catalog import LoggedCheckpoint
from tracking.checkpoint import snapshot_checkpoint
from tracking.commit import CheckpointSnapshot, Describe, commit_checkpoint
from tracking.config import TrackingConfig
from tracking.errors import TrackingError, one_line
from tracking.manifest import SHARDED_KIND, Manifest
from tracking.metrics import check_metrics
from tracking.parallel import distributed
from tracking.parallel.collective import commit
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import AsyncSaver, raise_background_errors, reserve_host_memory

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
            f"run {run_id}: retention keeps {layout.label(self.keyed_by, key)} ({model_id}) because registry "
            f"version {', '.join(versions)} points at it; delete the version first, or the checkpoint with "
            "`tracking gc --delete-registered`."
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


def _count(value: int, name: str) -> int:
    """``value`` when it is an int (an epoch or a step); else the ValueError log_checkpoint raises for it."""
    if isinstance(value, bool) or not isinstance(value, int):
        # Checked here: "8" % 4 is string formatting, and fails with a TypeError that names nothing.
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


class Checkpointer:
    """Saves every ``every_n_epochs`` epochs (or ``every_n_steps`` steps) and keeps the last N and the best K.

    With ``every_n_steps``, :meth:`save` takes the global ``step`` and the checkpoints are keyed
    by it (``checkpoint-step-00001500``: named, ordered and picked by step), for a training
    whose epochs are too long to checkpoint only at their end. A step is saved once however
    often :meth:`save` is called with it (every micro-batch of a gradient accumulation), unless ``force``.

    A checkpoint outside both sets is deleted (manifest first, then data, then its logged
    model) right after the next one commits; the latest checkpoint is always kept, and
    the run's ``latest``/``best`` tags always point at checkpoints that exist.
    ``keep_last=None`` and ``keep_best=None`` together keep everything.

    With ``async_save=True``, :meth:`save` blocks only while the state is copied to
    host memory; the upload and retention run in the background, one save at a time
    (``on_busy="wait"`` blocks a new save while one is in flight, ``"coalesce"``
    queues it, dropping a queued one it supersedes). Background errors re-raise on
    the next save or on :meth:`close`; pending saves are flushed at interpreter exit.

    Every save also rewrites the run's description in the MLflow UI (see :mod:`tracking.note`),
    in the request that moves the run's tags; ``commands`` adds command lines to it (how to
    evaluate or resume this run), ``describe_run=False`` leaves the description alone.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        *,
        run_id: str | None = None,
        config: TrackingConfig | None = None,
        async_save: bool = False,
        on_busy: str = "wait",
        describe_run: bool = True,
        commands: Sequence[str] = (),
        every_n_steps: int | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        if every_n_steps is not None and every_n_epochs != 1:
            raise ValueError(
                f"a Checkpointer saves every_n_epochs={every_n_epochs} or every_n_steps={every_n_steps}, not both: "
                "its checkpoints are keyed by one of them. To save at the end of an epoch too, call "
                "save(..., step=, force=True) there."
            )
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if mode not in layout.MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.keyed_by = layout.EPOCH if every_n_steps is None else layout.STEP
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self._run_id = run_id
        self._config = config
        self._handle: RunHandle | None = None
        # key (epoch, or step) -> monitored value (None when the checkpoint lacks it), for retention, and
        # key -> (model ID, artifact location), to delete what falls out.
        self._kept: dict[int, float | None] | None = None
        self._models: dict[int, tuple[str, str]] = {}
        # key -> model ID and metrics of every committed checkpoint, for the run's description.
        self._noted: dict[int, note.NotedCheckpoint] = {}
        self.describe_run = describe_run
        self.commands = tuple(commands)
        self._saver = AsyncSaver(on_busy) if async_save else None
        self._pinned = 0  # bytes of pinned host memory reserved for async snapshots
        self._saved_step: int | None = None  # the global step of this Checkpointer's last save
        self._run_checked = False  # whether the run's key was checked, at the first save() call (see _check_run)

    def should_save(self, epoch: int, step: int | None = None) -> bool:
        if self.every_n_steps is None:
            return _count(epoch, "epoch") % self.every_n_epochs == 0
        if step is None:
            self._refuse_no_step()
        step = _count(step, "step")
        # A loop may pass one global step many times (gradient accumulation calls save() every micro-batch).
        return step % self.every_n_steps == 0 and step != self._saved_step

    def _refuse_no_step(self) -> NoReturn:
        raise ValueError(f"Checkpointer(every_n_steps={self.every_n_steps}) saves by step: pass step= to save()")

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        epoch: int,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        step: int | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        extra: Mapping[str, Any] | None = None,
        rank_state: Any = None,
        model_kwargs: Mapping[str, Any] | None = None,
        scheduler_kwargs: Mapping[str, Any] | None = None,
    ) -> LoggedCheckpoint | Future[LoggedCheckpoint] | None:
        """Log a checkpoint if ``epoch`` (``step``, with ``every_n_steps``) is due, or ``force``; then apply retention.

        The arguments mean what they mean for :func:`tracking.log_checkpoint`; the run, the
        config and the monitored metric are the Checkpointer's own, set when it is made.
        Returns None when no save was due, and a future of the result when saving asynchronously.
        Under ``torchrun`` every rank calls it, as :func:`tracking.log_checkpoint` says; rank 0
        alone talks to MLflow and applies retention. The first call, due or not, refuses a run whose
        checkpoints are keyed otherwise (by epoch for ``every_n_steps``, by step else).
        """
        if step is None and self.every_n_steps is not None:
            self._refuse_no_step()  # forced or not: the step is the checkpoint's key
        due = force or self.should_save(epoch, step)
        if not self._run_checked:
            self._check_run()
        if not due:
            if self._saver is not None:
                # Between saves: the pinned memory the next snapshot needs gets ready off the loop's path.
                state = (model.state_dict(), optimizer.state_dict() if optimizer is not None else None)
                self._pinned = reserve_host_memory(state, self._pinned)
            return None
        if self._saver is not None and self._saver.on_busy == "coalesce" and distributed.active():
            # Ranks would drop different saves, and a sharded save needs every rank's part.
            raise ValueError('on_busy="coalesce" cannot be used under a process group; use on_busy="wait"')
        clean = check_metrics(metrics)
        if self.keep_best is not None and self.monitor not in clean:
            raise ValueError(
                f"keep_best={self.keep_best} ranks checkpoints by {self.monitor!r}, which is not in "
                f"metrics {sorted(clean)}; pass it, or set monitor= to a metric you log."
            )
        snapshot = snapshot_checkpoint(
            model,
            optimizer,
            epoch=epoch,
            metrics=clean,
            monitor=self.monitor if self.monitor in clean else None,
            mode=self.mode,
            step=step,
            keyed_by=self.keyed_by,
            scheduler=scheduler,
            scaler=scaler,
            extra=extra,
            rank_state=rank_state,
            model_kwargs=model_kwargs,
            scheduler_kwargs=scheduler_kwargs,
        )
        handle = None
        if distributed.rank() == 0:
            handle = self._open()
            self._existing(handle)
        # A background save that failed unnoticed fails this save, whichever kind it is.
        raise_background_errors()
        if self._saver is None:
            logged = self._commit(handle, snapshot)
            self._saved_step = step
            return logged
        host = snapshot.to_host()
        distributed.prepare()
        future = self._saver.submit(lambda: self._commit(handle, host))
        self._saved_step = step
        return future

    def _commit(self, handle: RunHandle | None, snapshot: CheckpointSnapshot) -> LoggedCheckpoint:
        """Commit from every rank; ``handle`` (rank 0's alone) does the run's description and retention."""
        manifest = snapshot.manifest
        if handle is None:
            return commit(None, snapshot)
        describe = self._describer(handle, manifest) if self.describe_run else None
        if manifest.kind == SHARDED_KIND or distributed.active():
            return commit(handle, snapshot, describe, after=lambda logged: self._committed(handle, manifest, logged))
        logged = commit_checkpoint(handle, snapshot, describe)
        self._committed(handle, manifest, logged)
        return logged

    def _describer(self, handle: RunHandle, manifest: Manifest) -> Describe:
        key = manifest.key
        assert key is not None and self._kept is not None
        known = self._kept
        value = manifest.metrics.get(self.monitor)

        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            # The checkpoints as they will be once this one is committed and retention has run.
            noted = {**self._noted, key: note.NotedCheckpoint(model_id, dict(manifest.metrics))}
            kept = self._retained({**known, key: value}, latest=key) if self._retains else set(noted)
            retained = {e: c for e, c in noted.items() if e in kept}
            return note.describe_run(
                handle.run_id, manifest, retained, tags, monitor=self.monitor, commands=self.commands
            )

        return describe

    def _committed(self, handle: RunHandle, manifest: Manifest, logged: LoggedCheckpoint) -> None:
        key = manifest.key
        assert key is not None and self._kept is not None
        value = manifest.metrics.get(self.monitor)
        self._kept[key] = value
        assert logged.model_id is not None and logged.artifact_uri is not None
        self._models[key] = (logged.model_id, logged.artifact_uri)
        self._noted[key] = note.NotedCheckpoint(logged.model_id, dict(manifest.metrics))
        # The save is committed: what retention cannot do now it says in one line, and the next save retries.
        done = self._apply_retention(handle, self._kept, latest=key)
        for line in done.warnings(handle.run_id):
            _log.warning("%s", line)

    @property
    def _retains(self) -> bool:
        return self.keep_last is not None or self.keep_best is not None

    def _open(self) -> RunHandle:
        if self._handle is None:
            self._handle = open_run(target_run_id(self._run_id), self._config)
        return self._handle

    def _check_run(self) -> None:
        """Refuse a run keyed otherwise than this Checkpointer saves, at its first save() call, due or not.

        Else ``every_n_steps=N`` on a run keyed by epoch (or the reverse) would fail at its first due
        save, N steps of training later: the integrations refuse such a fit when it starts too. Rank 0
        asks and every rank raises. What it reads (the run, and its committed checkpoints, for retention and
        the run's description or when the tags do not say their key) is what the first due save reads:
        the check costs no request of its own, and later calls none.
        """

        def ask() -> None:
            handle = self._open()
            if not handle.tags:
                handle.refresh_tags()
            # When the tags do not say the run's key, its committed checkpoints do: one search for both.
            listed = catalog.search(handle) if layout.keyed_by_of(handle.tags) is None else None
            catalog.refuse_mixed_keys(handle, self.keyed_by, listed)
            self._existing(handle, listed)

        distributed.on_rank0(ask)
        self._run_checked = True

    def _existing(
        self, handle: RunHandle, listed: list[catalog.StoredCheckpoint] | None = None
    ) -> dict[int, float | None]:
        # Read once per Checkpointer: a resumed run's earlier checkpoints count for retention
        # and its description too. ``listed``: the run's committed checkpoints, when just searched.
        if self._kept is None:
            self._kept = {}
            if self._retains or self.describe_run:
                committed = catalog.committed(handle) if listed is None else catalog.current(handle, listed)
                for key, stored in committed.items():
                    self._kept[key] = stored.metrics.get(self.monitor)
                    self._models[key] = (stored.model_id, stored.artifact_uri)
                    self._noted[key] = note.NotedCheckpoint(stored.model_id, stored.metrics)
        return self._kept

    def _retained(self, kept: Mapping[int, float | None], latest: int) -> set[int]:
        """The keys retention keeps of ``kept`` (key -> monitored value) once ``latest`` is committed."""
        keep = {latest}
        if self.keep_last is not None:
            keep.update(sorted(kept)[-self.keep_last :])
        if self.keep_best is not None:
            keep.update(layout.best_first(kept, self.mode)[: self.keep_best])
        return keep

    def _apply_retention(
        self, handle: RunHandle, kept: dict[int, float | None], latest: int, *, delete_registered: bool = False
    ) -> Retention:
        """Delete what falls outside the kept set; what cannot be deleted now stays in the policy's state.

        A checkpoint that fails to delete (a stalled server) stays in ``kept``, so the next pass
        retries it; one that a registry version points at is kept (and dropped from the policy, so
        it is reported once) unless ``delete_registered``. The checkpoint just committed is never
        at stake: nothing here raises for a deletion.
        """
        done = Retention(keyed_by=layout.keyed_by_of(handle.tags) or layout.EPOCH)
        if not self._retains:
            return done
        keep = self._retained(kept, latest)
        doomed = sorted(set(kept) - keep)
        if not doomed:
            return done
        try:
            # The run's tags as they are now: another writer may have moved best since this one committed.
            handle.refresh_tags()
            registered = {} if delete_registered else registry.versions_by_model(handle)
            staying = {handle.tags.get(layout.TAG_LATEST), *registered}
            self._repoint_best(handle, kept, keep, [e for e in doomed if self._models[e][0] not in staying])
        except TrackingError as exc:
            # Without the run's tags, deleting could leave best naming a missing checkpoint: retry next pass.
            done.failed = {key: (self._models[key][0], exc) for key in doomed}
            return done
        for key in doomed:
            model_id, artifact_uri = self._models[key]
            if model_id == handle.tags.get(layout.TAG_LATEST):
                continue  # another writer's latest (re-logged or newer checkpoints of its own): not ours to delete
            if model_id in registered:
                done.registered[key] = (model_id, registered[model_id])
            else:
                try:
                    catalog.delete(handle, model_id, artifact_uri)
                except TrackingError as exc:
                    done.failed[key] = (model_id, exc)
                    continue
                done.deleted.append(key)
            del kept[key]
            del self._models[key]
            self._noted.pop(key, None)
        return done

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

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait(self) -> None:
        """Block until background saves are committed; re-raise their error."""
        if self._saver is not None:
            self._saver.wait()

    def close(self) -> None:
        """Flush background saves and release the run handle."""
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            self._handle = None
            self._run_checked = False  # a save after this opens the run again, and checks it again
