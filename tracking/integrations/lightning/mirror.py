"""The CheckpointIO mirror: Lightning's own CheckpointIO, plus a commit of each file it saves.

Each file Lightning writes is committed as it is (``checkpoint.pt``, manifest format ``"lightning"``)
to the run, on the calling thread or on the library's background saver, keyed as the fit decided
(by epoch, or by global step when its ModelCheckpoint saves by step); a second save of the same
epoch and step (``last.ckpt``) is the same logged model, not another upload; a file ``ModelCheckpoint``
removes hands its model to :mod:`~tracking.integrations.lightning.kept`, which deletes it once no kept
file is it. Under DDP a failed upload is held and raised on every rank together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from tracking import layout, note
from tracking.catalog import LoggedCheckpoint
from tracking.commit import Describe, commit_local_files
from tracking.config import TrackingConfig
from tracking.errors import one_line
from tracking.integrations.lightning.description import (
    HYPERPARAMETERS_FIX,
    SaveContext,
    keying,
    save_context,
    save_manifest,
    save_monitor,
    saves_weights_only,
    weights_only,
)
from tracking.integrations.lightning.kept import KeptCheckpoints
from tracking.integrations.lightning.resume import RESUME_LINE, WEIGHTS_ONLY_LINE
from tracking.manifest import Manifest
from tracking.parallel import distributed
from tracking.payload import check_loadable
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import AsyncSaver

_log = logging.getLogger(__name__)


class Owner(Protocol):
    """What the mirror reads of the callback that attached it (``MLflowCheckpoints``)."""

    run_id: str | None
    background: bool
    config: TrackingConfig | None
    describe_run: bool
    commands: tuple[str, ...]
    monitor: str | None
    mode: str
    keyed_by: str | None

    def context(self, epoch: int, step: int) -> SaveContext | None: ...


class MirrorIO(CheckpointIO):
    """Lightning's own CheckpointIO, plus a commit of each saved file and a deletion of each removed one."""

    def __init__(self, owner: Owner, trainer: pl.Trainer, inner: CheckpointIO) -> None:
        self.owner = owner
        self.trainer = trainer
        self.inner = inner
        self._handle: RunHandle | None = None
        self._lock = threading.Lock()
        self._kept = KeptCheckpoints()
        # With owner.background: made by the first save of a fit, closed at its end (see stop). The process's one
        # background thread ends whenever no saver has work, so a Trainer made per trial of a sweep leaves no thread
        # behind, nor do saves no fit's end follows (trainer.save_checkpoint outside fit).
        self._saver: AsyncSaver | None = None
        self._uploading: set[str] = set()  # paths whose background upload is queued or running
        self._removals: list[str] = []  # removals waiting for the uploads in flight
        self._error: BaseException | None = None  # a DDP save's error, raised on every rank later

    # --- CheckpointIO ----------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
        if self.owner.background and self._saver is None:
            self._saver = AsyncSaver("wait", log_when_idle=True)
        if self._saver is not None:
            # Never rewrite a file its upload is still reading (last.ckpt, saved every epoch).
            while True:
                with self._lock:
                    busy = path in self._uploading
                if not busy:
                    break
                try:
                    self._saver.wait()
                except BaseException as exc:  # an earlier background upload failed: said now
                    self._fail(exc)
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        epoch, step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        context = self.owner.context(epoch, step)
        try:
            if context is None:
                # Saved without the callback's hook (trainer.save_checkpoint outside fit): described from here.
                context = save_context(self.trainer, self.trainer.lightning_module)
            handle = self.open()
            partial = saves_weights_only(checkpoint)
            if not partial and self._saver is not None and self._kept.uploading_weights_only(epoch, step):
                # The weights alone of this save are uploading (a ModelCheckpoint(save_weights_only=True) saved
                # first): this whole checkpoint replaces them once they are committed.
                self._saver.wait()
            alias = self._kept.alias(path, epoch, step, partial)
            if alias is not None:
                if alias[0] is not None:
                    self._kept.note_path(handle, alias[0], path, alias[1])
                return
            try:
                # What is committed must load with torch.load(weights_only=True), as every checkpoint does.
                check_loadable(checkpoint, "the Lightning checkpoint")
            except ValueError as exc:
                raise ValueError(
                    f"run {handle.run_id}: {path} is not uploaded: {exc} ({HYPERPARAMETERS_FIX})"
                ) from None
            # Decided at the fit's setup; a save outside fit (trainer.save_checkpoint) asks the trainer's callbacks.
            key = self.owner.keyed_by or keying(self.trainer)
            manifest = save_manifest(checkpoint, epoch, step, context, key)
            monitor, mode = save_monitor(self.trainer, path, manifest, self.owner.monitor, self.owner.mode)
        except BaseException as exc:
            self._fail(exc)
            return
        self._kept.begin(epoch, step, weights_only(manifest))
        if self._saver is None:
            try:
                self._commit(handle, path, manifest, monitor, mode, context.chart_step)
            except BaseException as exc:
                self._fail(exc)
            return
        with self._lock:
            self._uploading.add(path)
        try:
            chart_step = context.chart_step
            self._saver.submit(lambda: self._upload(handle, path, manifest, monitor, mode, chart_step))
        except BaseException as exc:  # an earlier background upload failed: this one is not made either
            with self._lock:
                self._uploading.discard(path)
            self._kept.abandon(epoch, step)
            self._fail(exc)

    def remove_checkpoint(self, path: Any) -> None:
        path = str(path)
        queue = getattr(self.trainer.strategy.checkpoint_io, "_executor", None)
        if isinstance(queue, ThreadPoolExecutor):
            # Lightning's AsyncCheckpointIO saves (through this mirror: the write, then the upload) on its one
            # worker thread, in order, but removes on the trainer's: the file may still be written or uploaded.
            # Queued behind the saves submitted before it, the removal comes after them, as in a blocking fit.
            queue.submit(self._remove_after_saves, path)
            return
        self._remove(path)

    def _remove_after_saves(self, path: str) -> None:
        try:
            self._remove(path)
        except BaseException as exc:  # on the worker thread: held, raised by the trainer at the next epoch
            _log.error("could not remove %s: %s", path, one_line(exc))
            with self._lock:
                self._error = self._error or exc

    def _remove(self, path: str) -> None:
        with self._lock:
            if self._uploading:
                # The upload in flight may read this very file: remove it, and its model, once it is done.
                self._removals.append(path)
                return
        self.inner.remove_checkpoint(path)
        self._forget(path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def teardown(self) -> None:
        self.inner.teardown()

    # --- commit ----------------------------------------------------------------------------

    def _upload(
        self, handle: RunHandle, path: str, manifest: Manifest, monitor: str | None, mode: str, chart_step: int
    ) -> None:
        try:
            self._commit(handle, path, manifest, monitor, mode, chart_step)
        finally:
            with self._lock:
                self._uploading.discard(path)
                removals, self._removals = (self._removals, []) if not self._uploading else ([], self._removals)
            for removed in removals:
                try:
                    self.inner.remove_checkpoint(removed)
                except OSError as exc:
                    _log.warning("could not remove %s after its upload: %s", removed, exc)
                self._forget(removed)

    def _commit(
        self, handle: RunHandle, path: str, manifest: Manifest, monitor: str | None, mode: str, chart_step: int
    ) -> None:
        """Commit the file at ``path``, its metrics charted at ``chart_step`` (where Lightning's loggers chart them)."""
        assert manifest.epoch is not None and manifest.step is not None
        describe = self._describer(handle, manifest) if self.owner.describe_run else None
        try:
            logged = commit_local_files(
                handle,
                manifest,
                {layout.CHECKPOINT_FILE: Path(path)},
                monitor=monitor,
                mode=mode,
                describe=describe,
                chart_step=chart_step,
            )
        except BaseException:
            self._kept.abandon(manifest.epoch, manifest.step)
            raise
        for removed in self._kept.record(handle, logged, manifest, path):
            self._forget(removed)

    def _forget(self, path: str) -> None:
        """``path`` was removed by ModelCheckpoint: drop it, and its model when no kept file is it any more."""

        def may_precede_commit() -> bool:
            # Lightning's AsyncCheckpointIO may remove a file before its commit ran: dropped then.
            return self.owner.background or isinstance(self.trainer.strategy.checkpoint_io, _WrappingCheckpointIO)

        model_id = self._kept.removed(path, may_precede_commit)
        if model_id is not None and self._handle is not None:
            self._kept.release(self._handle, model_id, path)

    # --- the run, errors, flushing ------------------------------------------------------------

    def open(self) -> RunHandle:
        if self._handle is None:
            run_id, config = self._target()
            self._handle = open_run(run_id, config)
            self._kept.seed(self._handle)
        return self._handle

    def run_id(self) -> str | None:
        """The run this mirror logs to, once it opened it."""
        return None if self._handle is None else self._handle.run_id

    def follow_run(self) -> None:
        """Start over with the run a fit logs to when an earlier fit of the Trainer logged to another (its second
        fit inside another ``mlflow.start_run()``): its checkpoints go there, not into the earlier fit's run."""
        if self._handle is not None and self._target()[0] != self._handle.run_id:
            self._handle = None
            self._kept = KeptCheckpoints()

    def _target(self) -> tuple[str, TrackingConfig]:
        """The run the trainer logs to (its MLFlowLogger's, else the callback's run_id, else the active run)."""
        config = self.owner.config or TrackingConfig.from_env()
        logger = next((lg for lg in self.trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is None:
            return target_run_id(self.owner.run_id), config
        uri = getattr(logger, "_tracking_uri", None)
        if uri and uri != config.tracking_uri:
            config = replace(config, tracking_uri=uri)
        return str(logger.run_id), config

    def _describer(self, handle: RunHandle, manifest: Manifest) -> Describe:
        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            # The checkpoints as they will be once this one is committed (it replaces others of its key).
            kept = self._kept.noted()
            assert manifest.key is not None
            kept[manifest.key] = note.NotedCheckpoint(model_id, dict(manifest.metrics))
            monitor = tags.get(layout.TAG_MONITOR)
            commands = self.owner.commands
            if weights_only(manifest):  # no fit resumes from it: the description says what works instead
                commands = tuple(WEIGHTS_ONLY_LINE if line == RESUME_LINE else line for line in commands)
            return note.describe_run(handle.run_id, manifest, kept, tags, monitor=monitor, commands=commands)

        return describe

    def _fail(self, exc: BaseException) -> None:
        if distributed.active():
            # Raising here, on rank 0 alone, would leave the other ranks waiting at Lightning's barrier:
            # every rank raises it together at the next epoch or the end of fit.
            _log.error("checkpoint upload failed (raised on every rank at the next epoch): %s", one_line(exc))
            with self._lock:
                self._error = self._error or exc
            return
        raise exc

    def raise_pending(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def flush(self) -> None:
        if self._saver is not None:
            self._saver.wait()
        self._kept.flush_tags()

    def stop(self) -> None:
        """Close the background saver once its uploads are done (flush raised any failure already); the next save
        makes another."""
        saver, self._saver = self._saver, None
        if saver is not None:
            try:
                saver.close()
            except BaseException as exc:
                _log.error("checkpoint upload failed: %s", one_line(exc))

    def logged(self) -> list[LoggedCheckpoint]:
        return self._kept.logged()

    def paths_of(self, epoch: int, step: int) -> set[str]:
        return self._kept.paths_of(epoch, step)
