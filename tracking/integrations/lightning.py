"""PyTorch Lightning: every checkpoint ``ModelCheckpoint`` writes becomes a checkpoint logged model of the run.

One line attaches it::

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), MLflowCheckpoints()])

and resuming by run ID is Lightning's own resume, fed from the run::

    trainer.fit(model, ckpt_path=checkpoint_path(run_id))  # or "best", an epoch, models:/...

:class:`MLflowCheckpoints` wraps the strategy's ``CheckpointIO`` (inside Lightning's
``AsyncCheckpointIO`` when there is one, so the upload runs in its thread once the local file is
written). Each file Lightning writes is committed as it is (``checkpoint.pt``, manifest format
``"lightning"``) with its epoch, global step and the trainer's metrics at the save; a second save
of the same epoch and step (``last.ckpt``) is the same logged model, not another upload; a file
``ModelCheckpoint`` removes (``save_top_k``) removes its logged model once no kept file is it; the
run's latest/best tags follow ``ModelCheckpoint``'s ``monitor`` and ``mode``. The callback also
keeps the RNG states in the checkpoint (its own callback state), so that a resume draws the same
batches and dropout masks as a run that never stopped.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from tracking import catalog, layout, note, spec
from tracking.catalog import LoggedCheckpoint
from tracking.commit import Describe, commit_local_files
from tracking.config import TrackingConfig
from tracking.download import download_files
from tracking.errors import ConfigError, TrackingError, one_line
from tracking.manifest import Manifest, now, versions
from tracking.parallel import distributed
from tracking.payload import check_loadable
from tracking.rng import capture_rng_state, restore_rng_state
from tracking.run import RunHandle, open_run, target_run_id, tracking_server_errors
from tracking.saver import AsyncSaver
from tracking.selection import Selector, find_checkpoint

_log = logging.getLogger(__name__)
_LIGHTNING_VERSION = importlib.metadata.version("lightning")

FORMAT = "lightning"
# The logged model tag listing the local files (paths Lightning wrote) that are this checkpoint: a
# resumed run's ModelCheckpoint removes files of the run before it, and this says which model each is.
TAG_PATHS = "tracking.lightning.paths"
RESUME_LINE = "# resume: trainer.fit(model, ckpt_path=tracking.integrations.lightning.checkpoint_path('{run_id}'))"


def checkpoint_path(
    source: str,
    checkpoint: Selector = "latest",
    *,
    to: str | os.PathLike[str] | None = None,
    config: TrackingConfig | None = None,
) -> str:
    """A local copy of a Lightning checkpoint of a run, for ``trainer.fit(model, ckpt_path=...)``.

    ``source`` and ``checkpoint`` name it as in :func:`tracking.load` (a run ID with ``"latest"``,
    ``"best"`` or an epoch; ``models:/...``). The file is downloaded into ``to`` (default: a folder
    per logged model under the temporary directory), checked against its sha256, and its path returned.
    """
    located = find_checkpoint(source, checkpoint, config=config)
    if located.manifest.format != FORMAT:
        raise ConfigError(
            f"run {located.run_id}: {located.label} was logged as format {located.manifest.format!r}, not by "
            "Lightning; load it with tracking.load() instead of resuming a Trainer from it."
        )
    folder = Path(to) if to is not None else Path(tempfile.gettempdir()) / "tracking-lightning" / str(located.model_id)
    download_files(located, folder, force=True)
    return str(folder / layout.CHECKPOINT_FILE)


@dataclass(frozen=True)
class _SaveContext:
    """What the main thread knows at a save, for the commit that may run in another thread."""

    metrics: dict[str, float]
    model: dict[str, Any]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None


@dataclass
class _Kept:
    """A committed checkpoint of this trainer: its model, the local paths that are it, its epoch and metrics."""

    model_id: str
    artifact_uri: str
    epoch: int
    step: int
    metrics: dict[str, float]
    paths: set[str]


class MLflowCheckpoints(pl.Callback):
    """Mirror ``ModelCheckpoint``'s checkpoints into MLflow as checkpoint logged models of the run.

    The run is the trainer's ``MLFlowLogger`` run when it has one, else ``run_id``, else the active
    MLflow run. ``background=True`` uploads on the library's background saver: the training loop
    waits only for Lightning's local save (with Lightning's ``AsyncCheckpointIO`` the upload runs in
    its thread instead). A failed upload is never silent: it raises from the save, from the next
    one, or at the end of ``fit`` (under DDP on every rank, at the next epoch or the end of fit).
    ``commands`` adds lines to the run's description (``{run_id}`` is replaced). The run's best pointer
    follows the ``monitor`` and ``mode`` of the ModelCheckpoint that wrote the file, or ``monitor=`` and
    ``mode=`` when given (with one ModelCheckpoint keeping the last N by step and another the best K).
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        background: bool = False,
        config: TrackingConfig | None = None,
        describe_run: bool = True,
        commands: Sequence[str] = (RESUME_LINE,),
        monitor: str | None = None,
        mode: str = "min",
    ) -> None:
        if mode not in layout.MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.run_id = run_id
        self.background = background
        self.config = config
        self.describe_run = describe_run
        self.commands = tuple(commands)
        self._io: _MirrorIO | None = None
        self._contexts: dict[tuple[int, int], _SaveContext] = {}
        self._lock = threading.Lock()

    # --- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, _WrappingCheckpointIO):
            # AsyncCheckpointIO: the mirror goes inside, so it runs in its thread after the local write.
            # Its public setter ignores a new inner IO once one is configured: the attribute is set directly.
            inner = current.checkpoint_io
            if not isinstance(inner, _MirrorIO):
                assert inner is not None
                self._io = _MirrorIO(self, trainer, inner)
                current._checkpoint_io = self._io
            else:
                self._io = inner
        elif isinstance(current, _MirrorIO):
            self._io = current
        else:
            self._io = _MirrorIO(self, trainer, current)
            strategy.checkpoint_io = self._io
        self._io.trainer = trainer
        if trainer.is_global_zero and stage == "fit":
            # On the main thread: MLflow's active run is per thread, and a save may run in another one.
            self._io.open()
        # The coordination group is made by every rank at the same point, before any save needs it.
        distributed.prepare()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
        key = (int(checkpoint["epoch"]), int(checkpoint["global_step"]))
        with self._lock:
            self._contexts[key] = _SaveContext(
                metrics=_finite_metrics(trainer.callback_metrics),
                model=_describe_module(pl_module),
                optimizer=spec.describe_optimizer(trainer.optimizers[0], pl_module) if trainer.optimizers else None,
                scheduler=_describe_scheduler(trainer),
            )

    def state_dict(self) -> dict[str, Any]:
        # Kept in the checkpoint (its "callbacks"), so that a resumed fit draws what the straight run drew.
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored while Lightning restores the checkpoint, before the fit loop makes its data iterator.
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree(wait=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree(wait=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._io is not None and not distributed.active():
            self._io.flush()

    # --- helpers ---------------------------------------------------------------------------

    def context(self, epoch: int, step: int) -> _SaveContext | None:
        with self._lock:
            return self._contexts.pop((epoch, step), None)

    def _agree(self, *, wait: bool) -> None:
        """Every rank raises rank 0's upload error, or none does (under DDP only rank 0 saves)."""
        error: BaseException | None = None
        if self._io is not None and distributed.rank() == 0:
            try:
                if wait:
                    self._io.flush()
                self._io.raise_pending()
            except BaseException as exc:
                error = exc
        distributed.raise_together(error)

    def logged(self) -> list[LoggedCheckpoint]:
        """The checkpoints this trainer committed that are kept (oldest first)."""
        return [] if self._io is None else self._io.logged()


class _MirrorIO(CheckpointIO):
    """Lightning's own CheckpointIO, plus a commit of each saved file and a deletion of each removed one."""

    def __init__(self, owner: MLflowCheckpoints, trainer: pl.Trainer, inner: CheckpointIO) -> None:
        self.owner = owner
        self.trainer = trainer
        self.inner = inner
        self._handle: RunHandle | None = None
        self._lock = threading.Lock()
        self._kept: dict[str, _Kept] = {}  # model ID -> what this trainer keeps
        self._by_path: dict[str, str] = {}  # local path -> model ID
        self._saver = AsyncSaver("wait") if owner.background else None
        self._uploading: set[str] = set()  # paths whose background upload is queued or running
        self._removals: list[str] = []  # removals waiting for the uploads in flight
        self._removed_early: set[str] = set()  # removed before their commit (Lightning's AsyncCheckpointIO)
        self._pending: dict[tuple[int, int], list[str]] = {}  # (epoch, step) uploading -> paths that are it too
        self._error: BaseException | None = None  # a DDP save's error, raised on every rank later
        self._logged: list[LoggedCheckpoint] = []
        self._tagging: list[Future[None]] = []  # path tags under way

    # --- CheckpointIO ----------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
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
            handle = self.open()
            alias = self._alias(path, epoch, step)
            if alias is not None:
                if alias[0] is not None:
                    self._note_path(handle, alias[0], path, alias[1])
                return
            try:
                # What is committed must load with torch.load(weights_only=True), as every checkpoint does.
                check_loadable(checkpoint, "the Lightning checkpoint")
            except ValueError as exc:
                raise ValueError(
                    f"run {handle.run_id}: {path} is not uploaded: {exc} (Lightning saves the module's "
                    "hyperparameters as they are: keep them to plain values.)"
                ) from None
            manifest = self._manifest(checkpoint, epoch, step, context)
            monitor, mode = self._monitor(path, manifest)
        except BaseException as exc:
            self._fail(exc)
            return
        with self._lock:
            self._pending[(epoch, step)] = []
        if self._saver is None:
            try:
                self._commit(handle, path, manifest, monitor, mode)
            except BaseException as exc:
                self._fail(exc)
            return
        with self._lock:
            self._uploading.add(path)
        try:
            self._saver.submit(lambda: self._upload(handle, path, manifest, monitor, mode))
        except BaseException as exc:  # an earlier background upload failed: this one is not made either
            with self._lock:
                self._uploading.discard(path)
                self._pending.pop((epoch, step), None)
            self._fail(exc)

    def remove_checkpoint(self, path: Any) -> None:
        path = str(path)
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

    def _upload(self, handle: RunHandle, path: str, manifest: Manifest, monitor: str | None, mode: str) -> None:
        try:
            self._commit(handle, path, manifest, monitor, mode)
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

    def _commit(self, handle: RunHandle, path: str, manifest: Manifest, monitor: str | None, mode: str) -> None:
        assert manifest.epoch is not None and manifest.step is not None
        describe = self._describer(handle, manifest) if self.owner.describe_run else None
        try:
            logged = commit_local_files(
                handle, manifest, {layout.CHECKPOINT_FILE: Path(path)}, monitor=monitor, mode=mode, describe=describe
            )
        except BaseException:
            with self._lock:
                self._pending.pop((manifest.epoch, manifest.step), None)
            raise
        assert logged.model_id is not None and logged.artifact_uri is not None
        with self._lock:
            # The commit replaced any other model of this epoch (a re-log, in the core's terms).
            for model_id in [m for m, kept in self._kept.items() if kept.epoch == manifest.epoch]:
                for stale in self._kept.pop(model_id).paths:
                    self._by_path.pop(stale, None)
            # This file, and those saved as the same epoch and step while it uploaded (last.ckpt).
            paths = {path, *self._pending.pop((manifest.epoch, manifest.step), [])}
            overwritten = [(self._by_path[p], p) for p in paths if p in self._by_path]
            self._kept[logged.model_id] = _Kept(
                logged.model_id, logged.artifact_uri, manifest.epoch, manifest.step, dict(manifest.metrics), paths
            )
            for saved in paths:
                self._by_path[saved] = logged.model_id
            self._logged.append(logged)
            early = paths & self._removed_early
            self._removed_early -= paths
        self._tag_paths(handle, logged.model_id, paths)
        for previous, saved in overwritten:
            self._release(handle, previous, saved)  # the file was overwritten: its old model may go
        for removed in early:
            self._forget(removed)

    def _manifest(self, checkpoint: dict[str, Any], epoch: int, step: int, context: _SaveContext | None) -> Manifest:
        if context is None:
            # Saved without the callback's hook (trainer.save_checkpoint outside fit): described from here.
            module = self.trainer.lightning_module
            context = _SaveContext(
                metrics=_finite_metrics(self.trainer.callback_metrics),
                model=_describe_module(module),
                optimizer=(
                    spec.describe_optimizer(self.trainer.optimizers[0], module) if self.trainer.optimizers else None
                ),
                scheduler=_describe_scheduler(self.trainer),
            )
        return Manifest(
            kind="checkpoint",
            files={},
            model=context.model,
            epoch=epoch,
            step=step,
            metrics=context.metrics,
            optimizer=context.optimizer if checkpoint.get("optimizer_states") else None,
            scheduler=context.scheduler if checkpoint.get("lr_schedulers") else None,
            extra_keys=sorted(k for k in checkpoint if k not in _MAPPED),
            format=FORMAT,
            versions={**versions(), "lightning": _LIGHTNING_VERSION},
            created_at=now(),
        )

    def _monitor(self, path: str, manifest: Manifest) -> tuple[str | None, str]:
        """The ModelCheckpoint that wrote ``path``: its monitor (when the metrics hold it) and mode."""
        if self.owner.monitor is not None:
            return (self.owner.monitor if self.owner.monitor in manifest.metrics else None), self.owner.mode
        callbacks = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        folder = os.path.realpath(os.path.dirname(path))
        writer = next(
            (c for c in callbacks if c.dirpath and os.path.realpath(str(c.dirpath)) == folder),
            callbacks[0] if callbacks else None,
        )
        if writer is None or writer.monitor is None or writer.monitor not in manifest.metrics:
            return None, "min"
        return writer.monitor, writer.mode

    def _alias(self, path: str, epoch: int, step: int) -> tuple[str | None, str | None] | None:
        """The model already committed for this epoch and step (``last.ckpt`` after the top-k file), if any,
        and the model ``path`` was before (the file is overwritten), if another. (None, None) when that
        checkpoint's upload is still under way: its commit takes ``path`` along."""
        with self._lock:
            if (epoch, step) in self._pending:
                self._pending[(epoch, step)].append(path)
                return None, None
            for model_id, kept in self._kept.items():
                if kept.epoch == epoch and kept.step == step:
                    previous = self._by_path.get(path)
                    kept.paths.add(path)
                    self._by_path[path] = model_id
                    return model_id, (previous if previous != model_id else None)
        return None

    def _note_path(self, handle: RunHandle, model_id: str, path: str, previous: str | None) -> None:
        with self._lock:
            paths = set(self._kept[model_id].paths) if model_id in self._kept else {path}
        self._tag_paths(handle, model_id, paths)
        if previous is not None:
            self._release(handle, previous, path)

    def _tag_paths(self, handle: RunHandle, model_id: str, paths: set[str]) -> None:
        """Tag the model with the local files that are it, beside the training (two requests not waited for)."""
        value = json.dumps(sorted(paths))

        def tag() -> None:
            try:
                handle.client.set_logged_model_tags(model_id, {TAG_PATHS: value})
            except Exception as exc:  # only a resumed run's retention needs it: the checkpoint is committed
                _log.warning(
                    "run %s: could not tag %s with its local paths: %s", handle.run_id, model_id, one_line(exc)
                )

        with self._lock:
            self._tagging = [f for f in self._tagging if not f.done()]
            self._tagging.append(_tagger.submit(tag))

    # --- retention -------------------------------------------------------------------------

    def _forget(self, path: str) -> None:
        """``path`` was removed by ModelCheckpoint: drop it, and its model when no kept file is it any more."""
        with self._lock:
            model_id = self._by_path.get(path)
            if model_id is None:
                if self._saver is None and not isinstance(self.trainer.strategy.checkpoint_io, _WrappingCheckpointIO):
                    return
                # Lightning's AsyncCheckpointIO may remove a file before its commit ran: drop it then.
                self._removed_early.add(path)
                return
        if self._handle is not None:
            self._release(self._handle, model_id, path)

    def _release(self, handle: RunHandle, model_id: str, path: str) -> None:
        with self._lock:
            if self._by_path.get(path) == model_id:
                del self._by_path[path]
            kept = self._kept.get(model_id)
            if kept is None:
                return
            kept.paths.discard(path)
            if kept.paths:
                return
            del self._kept[model_id]
            survivors = list(self._kept.values())
        try:
            self._repoint(handle, model_id, survivors)
            catalog.delete(handle, model_id, kept.artifact_uri)
        except TrackingError as exc:
            _log.warning(
                "run %s: could not delete checkpoint %s (epoch %s), which ModelCheckpoint removed (%s); "
                "`tracking gc` or `tracking verify --clean` removes it.",
                handle.run_id,
                model_id,
                kept.epoch,
                one_line(exc)[:300],
            )

    def _repoint(self, handle: RunHandle, leaving: str, survivors: list[_Kept]) -> None:
        """Before a checkpoint the run's latest or best tag names goes, point the tag at a survivor."""
        handle.refresh_tags()
        tags: dict[str, str] = {}
        if handle.tags.get(layout.TAG_LATEST) == leaving and survivors:
            newest = max(survivors, key=lambda k: (k.epoch, k.step))
            tags.update({layout.TAG_LATEST: newest.model_id, layout.TAG_LATEST_EPOCH: str(newest.epoch)})
        monitor = handle.tags.get(layout.TAG_MONITOR)
        if handle.tags.get(layout.TAG_BEST) == leaving and monitor:
            mode = handle.tags.get(layout.TAG_MODE, "min")
            scored = {k.model_id: k.metrics[monitor] for k in survivors if monitor in k.metrics}
            if scored:
                best = (min if mode == "min" else max)(scored, key=lambda m: scored[m])
                tags.update({layout.TAG_BEST: best, layout.TAG_BEST_VALUE: repr(scored[best])})
        handle.set_tags(tags)

    # --- the run, errors, flushing ------------------------------------------------------------

    def open(self) -> RunHandle:
        if self._handle is None:
            config = self.owner.config or TrackingConfig.from_env()
            logger = next((lg for lg in self.trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if logger is not None:
                uri = getattr(logger, "_tracking_uri", None)
                if uri and uri != config.tracking_uri:
                    config = replace(config, tracking_uri=uri)
                run_id = str(logger.run_id)
            else:
                run_id = target_run_id(self.owner.run_id)
            self._handle = open_run(run_id, config)
            self._seed(self._handle)
        return self._handle

    def _seed(self, handle: RunHandle) -> None:
        """A resumed run's checkpoints, by the local paths that are them: its ModelCheckpoint may remove them.

        One search (paged), which brings each model's tags: no request per checkpoint.
        """
        committed = {c.model_id: c for c in catalog.committed(handle).values()}
        if not committed:
            return
        token = None
        while True:
            with tracking_server_errors(handle.run_id, "listing the run's checkpoints"):
                page = handle.client.search_logged_models(
                    experiment_ids=[handle.experiment_id],
                    filter_string=f"source_run_id = '{handle.run_id}'",
                    max_results=100,
                    page_token=token,
                )
            for model in page:
                stored = committed.get(model.model_id)
                raw = (model.tags or {}).get(TAG_PATHS)
                if stored is None or stored.epoch is None or not raw:
                    continue
                try:
                    paths = {str(p) for p in json.loads(raw)}
                    step = int((model.params or {}).get(layout.PARAM_STEP, "0"))
                except (ValueError, TypeError):
                    continue  # a tag edited by hand: that checkpoint is left to `tracking gc`
                with self._lock:
                    self._kept[stored.model_id] = _Kept(
                        stored.model_id, stored.artifact_uri, stored.epoch, step, dict(stored.metrics), paths
                    )
                    for path in paths:
                        self._by_path[path] = stored.model_id
            token = page.token
            if not token:
                return

    def _describer(self, handle: RunHandle, manifest: Manifest) -> Describe:
        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            # The checkpoints as they will be once this one is committed (it replaces others of its epoch).
            with self._lock:
                kept = {k.epoch: note.NotedCheckpoint(k.model_id, k.metrics) for k in self._kept.values()}
            assert manifest.epoch is not None
            kept[manifest.epoch] = note.NotedCheckpoint(model_id, dict(manifest.metrics))
            by_model = {c.model_id: e for e, c in kept.items()}
            text = note.render(
                handle.run_id,
                model_class=str(manifest.model.get("class")),
                optimizer_class=(manifest.optimizer or {}).get("class"),
                checkpoints=kept,
                latest=by_model.get(tags.get(layout.TAG_LATEST, "")),
                best=by_model.get(tags.get(layout.TAG_BEST, "")),
                monitor=tags.get(layout.TAG_MONITOR),
                commands=[c.replace("{run_id}", handle.run_id) for c in self.owner.commands],
            )
            return {note.NOTE_TAG: text}

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
        with self._lock:
            tagging, self._tagging = self._tagging, []
        for future in tagging:
            future.result()

    def logged(self) -> list[LoggedCheckpoint]:
        with self._lock:
            kept = set(self._kept)
            return [entry for entry in self._logged if entry.model_id in kept]


# Sets the path tags of every trainer's checkpoints, off the training loop's path.
_tagger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking-lightning-tags")

# Lightning keys that the core maps onto its own (see tracking.rebuild.checkpoint_state).
_MAPPED = ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step")


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue  # a tensor of several values
        if math.isfinite(number):
            out[str(name)] = number
    return out


def _describe_module(module: pl.LightningModule) -> dict[str, Any]:
    """The LightningModule's class, with its saved hyperparameters as its init arguments."""
    hparams = dict(module.hparams) if module.hparams else None
    if hparams is not None and spec.is_json(hparams):
        return {"class": spec.class_path(type(module)), "init_kwargs": hparams, "init_kwargs_source": "hparams"}
    described = spec.describe_model(module, None)
    if hparams is not None:
        described["note"] = (
            "its saved hyperparameters are not JSON-serialisable; to load, pass model=<instance or factory>"
        )
    return described


def _describe_scheduler(trainer: pl.Trainer) -> dict[str, Any] | None:
    configs = trainer.lr_scheduler_configs
    if not configs:
        return None
    try:
        return spec.describe_scheduler(configs[0].scheduler, None)
    except Exception:  # a scheduler whose arguments cannot be read back: the loader leaves it out
        return {"class": spec.class_path(configs[0].scheduler), "init_kwargs": None}
