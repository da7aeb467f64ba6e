"""A training loop's checkpoint policy: when to save, and which checkpoints to keep."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, NoReturn

from torch import nn

from tracking import catalog, layout, note, optimizers
from tracking.catalog import LoggedCheckpoint
from tracking.checkpoint import saving_label, snapshot_checkpoint
from tracking.commit import CheckpointSnapshot, Describe, commit_checkpoint
from tracking.config import TrackingConfig
from tracking.manifest import SHARDED_KIND, Manifest
from tracking.metrics import check_metrics
from tracking.number import integral, plain
from tracking.optimizers import Optimizers
from tracking.parallel import distributed
from tracking.parallel.collective import commit, keys_named, refuse_different_keys
from tracking.payload import check_int64
from tracking.retention import RetentionPolicy
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import AsyncSaver, raise_background_errors, reserve_host_memory

_log = logging.getLogger(__name__)


def _count(value: int, name: str) -> int:
    """``value`` as a plain int when it is an integer (an epoch or a step); else the ValueError log_checkpoint
    raises for it."""
    count = integral(value)
    if count is None:
        # Checked here: "8" % 4 is string formatting, and fails with a TypeError that names nothing.
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return count


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
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.keyed_by = layout.EPOCH if every_n_steps is None else layout.STEP
        self.retention = RetentionPolicy(keep_last, keep_best, monitor, mode)
        self._run_id = run_id
        self._config = config
        self._handle: RunHandle | None = None
        self.describe_run = describe_run
        self.commands = tuple(commands)
        self._saver = AsyncSaver(on_busy) if async_save else None
        self._pinned = 0  # bytes of pinned host memory reserved for async snapshots
        self._saved_step: int | None = None  # the global step of this Checkpointer's last save
        self._run_checked = False  # whether the run's key was checked, at the first save() call (see _check_run)

    @property
    def monitor(self) -> str:
        """The metric that ranks checkpoints for ``keep_best`` and the run's best."""
        return self.retention.monitor

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
        optimizer: Optimizers | None = None,
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
        chart_step: int | None = None,
    ) -> LoggedCheckpoint | Future[LoggedCheckpoint] | None:
        """Log a checkpoint if ``epoch`` (``step``, with ``every_n_steps``) is due, or ``force``; then apply retention.

        The arguments mean what they mean for :func:`tracking.log_checkpoint`; the run, the
        config and the monitored metric are the Checkpointer's own, set when it is made.
        ``chart_step`` is the step its metrics are charted at, in the run and its logged model (default: ``epoch``):
        a loop that saves in mid-epoch charts by its global step, so that two saves of one epoch are two points.
        Returns None when no save was due, and a future of the result when saving asynchronously.
        Under ``torchrun`` every rank calls it, as :func:`tracking.log_checkpoint` says; rank 0
        alone talks to MLflow and applies retention, by its own ``metrics`` (the other ranks may pass none).
        The first call, due or not, refuses a run whose checkpoints are keyed otherwise (by epoch for
        ``every_n_steps``, by step else), and ranks that pass different ``epoch=`` or ``step=``: every rank raises
        the same ValueError, before any rank skips or saves.
        """
        # Plain ints from here on: compared with the last saved step, sent to the other ranks, stored.
        epoch, step = plain(epoch), plain(step)  # type: ignore[assignment]
        if step is None and self.every_n_steps is not None:
            self._refuse_no_step()  # forced or not: the step is the checkpoint's key
        # At every call, due or not: a mistake is said at the first one, not epochs later at the first due save.
        optimizers.check(optimizer, scheduler, scheduler_kwargs)
        if chart_step is not None:
            check_int64("chart_step", chart_step)
        due = force or self.should_save(epoch, step)
        self._follow_active_run()
        if not self._run_checked:
            self._check_run(epoch, step)
        if not due:
            if self._saver is not None:
                # Between saves: the pinned memory the next snapshot needs gets ready off the loop's path.
                state = (model.state_dict(), optimizers.each(optimizer, lambda one: one.state_dict()))
                self._pinned = reserve_host_memory(state, self._pinned)
            return None
        if self._saver is not None and self._saver.on_busy == "coalesce" and distributed.active():
            # Ranks would drop different saves, and a sharded save needs every rank's part.
            raise ValueError('on_busy="coalesce" cannot be used under a process group; use on_busy="wait"')
        clean = check_metrics(metrics)
        # Rank 0's metrics rank the checkpoint (it alone applies retention): the other ranks need none. What rank 0
        # refuses or fails to read here is raised on every rank, by the commit's first step.
        _, refused = distributed.lead(lambda: self._check_monitor(clean))
        snapshot = snapshot_checkpoint(
            model,
            optimizer,
            epoch=epoch,
            metrics=clean,
            monitor=self.monitor if self.monitor in clean else None,
            mode=self.retention.mode,
            step=step,
            keyed_by=self.keyed_by,
            scheduler=scheduler,
            scaler=scaler,
            extra=extra,
            rank_state=rank_state,
            model_kwargs=model_kwargs,
            scheduler_kwargs=scheduler_kwargs,
            chart_step=chart_step,
        )
        handle = None
        if refused is None:
            handle, refused = distributed.lead(self._read_run)
        # A background save that failed unnoticed fails this save, whichever kind it is.
        raise_background_errors()
        if self._saver is None:
            logged = self._commit(handle, snapshot, refused)
            self._saved_step = step
            return logged
        host = snapshot.to_host()
        distributed.prepare()
        future = self._saver.submit(
            distributed.in_background(lambda: self._commit(handle, host, refused), saving_label(handle, host))
        )
        self._saved_step = step
        return future

    def _check_monitor(self, metrics: Mapping[str, float]) -> None:
        keep_best = self.retention.keep_best
        if keep_best is not None and self.monitor not in metrics:
            raise ValueError(
                f"keep_best={keep_best} ranks checkpoints by {self.monitor!r}, which is not in "
                f"metrics {sorted(metrics)}; pass it, or set monitor= to a metric you log."
            )

    def _read_run(self) -> RunHandle:
        handle = self._open()
        self.retention.read(handle, describe=self.describe_run)
        return handle

    def _commit(
        self, handle: RunHandle | None, snapshot: CheckpointSnapshot, refused: Exception | None = None
    ) -> LoggedCheckpoint:
        """Commit from every rank; ``handle`` (rank 0's alone) does the run's description and retention.
        ``refused``: rank 0's error before the commit, raised on every rank."""
        manifest = snapshot.manifest
        if handle is None:
            return commit(None, snapshot, config=self._config, refused=refused)
        describe = self._describer(handle, manifest) if self.describe_run else None
        if manifest.kind == SHARDED_KIND or distributed.active():
            return commit(handle, snapshot, describe, after=lambda logged: self._committed(handle, manifest, logged))
        logged = commit_checkpoint(handle, snapshot, describe)
        self._committed(handle, manifest, logged)
        return logged

    def _describer(self, handle: RunHandle, manifest: Manifest) -> Describe:
        key = manifest.key
        policy = self.retention
        assert key is not None and policy.kept is not None
        known = policy.kept
        value = manifest.metrics.get(self.monitor)

        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            # The checkpoints as they will be once this one is committed and retention has run.
            noted = {**policy.noted, key: note.NotedCheckpoint(model_id, dict(manifest.metrics))}
            kept = policy.retained({**known, key: value}, latest=key) if policy.retains else set(noted)
            retained = {e: c for e, c in noted.items() if e in kept}
            return note.describe_run(
                handle.run_id, manifest, retained, tags, monitor=self.monitor, commands=self.commands
            )

        return describe

    def _committed(self, handle: RunHandle, manifest: Manifest, logged: LoggedCheckpoint) -> None:
        key = manifest.key
        assert key is not None and logged.model_id is not None and logged.artifact_uri is not None
        self.retention.add(key, logged.model_id, logged.artifact_uri, manifest.metrics)
        # The save is committed: what retention cannot do now it says in one line, and the next save retries.
        done = self.retention.apply(handle, latest=key)
        for line in done.warnings(handle.run_id):
            _log.warning("%s", line)

    def _follow_active_run(self) -> None:
        """Start afresh when the active run is another than the one saved to (a sweep's next trial).

        A Checkpointer made without ``run_id`` saves to the active run, as :func:`tracking.log_checkpoint`
        does: the previous run's background saves are flushed, and its retention state, last saved step
        and key check are dropped, so that nothing of one run is saved to, or deleted from, another.
        Under a process group only rank 0 has a run, and the ranks keep the run they started with.
        """
        if self._run_id is not None or self._handle is None or distributed.active():
            return
        if target_run_id(None) == self._handle.run_id:
            return
        self.wait()
        retention = self.retention
        self.retention = RetentionPolicy(retention.keep_last, retention.keep_best, retention.monitor, retention.mode)
        self._handle = None
        self._saved_step = None
        self._run_checked = False

    def _open(self) -> RunHandle:
        if self._handle is None:
            self._handle = open_run(target_run_id(self._run_id), self._config)
        return self._handle

    def _check_run(self, epoch: int, step: int | None) -> None:
        """Refuse a run keyed otherwise than this Checkpointer saves, and ranks that pass different keys,
        at its first save() call, due or not.

        Else ``every_n_steps=N`` on a run keyed by epoch (or the reverse) would fail at its first due
        save, N steps of training later: the integrations refuse such a fit when it starts too. Ranks that
        count epochs (or steps) apart would find a save due on some ranks only, which would wait in the commit
        for the others, still training: a hang, before the commit could compare their keys. Rank 0 asks and
        every rank raises. What it reads (the run, and its committed checkpoints, for retention and the run's
        description or when the tags do not say their key) is what the first due save reads: the check costs
        no request of its own, and under a process group one small gather of the ranks' keys. Later calls cost
        neither (a step-keyed Checkpointer is called every step).
        """
        keys = distributed.gather(
            (epoch, step), arrival=f"the first Checkpointer.save call, due or not ({keys_named(epoch, step)})"
        )

        def ask() -> None:
            handle = self._open()
            refuse_different_keys(
                handle,
                keys,
                called="called Checkpointer.save (checked at its first call, due or not)",
                outcome="a rank whose save is due would wait in it for the others, which go on training: the job "
                "would hang",
            )
            if not handle.tags:
                handle.refresh_tags()
            # When the tags do not say the run's key, its committed checkpoints do: one search for both.
            listed = catalog.search(handle) if layout.keyed_by_of(handle.tags) is None else None
            catalog.refuse_mixed_keys(handle, self.keyed_by, listed)
            self.retention.read(handle, listed, describe=self.describe_run)

        distributed.on_rank0(ask)
        self._run_checked = True

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
