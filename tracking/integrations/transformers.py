"""The Hugging Face Trainer: every checkpoint folder it saves becomes a checkpoint logged model of the run.

::

    from tracking.integrations.transformers import TrackingCallback, checkpoint_folder

    trainer = Trainer(model, args, ..., callbacks=[TrackingCallback()])  # args.save_strategy="epoch"
    trainer.train()
    # later, in the same run: resume exactly where the run's latest checkpoint stopped
    trainer.train(resume_from_checkpoint=checkpoint_folder(run_id, output_dir=args.output_dir))

Each save of the Trainer (``<output_dir>/checkpoint-<step>``: ``model.safetensors``, ``config.json``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``, ...) is committed
as one logged model: every file with its sha256, the manifest last (format ``"transformers"``),
READY, the run's latest/best tags. The Trainer's own rotation (``save_total_limit``, keeping the
best checkpoint of ``metric_for_best_model``) is mirrored: a logged model whose folder the
Trainer deleted is deleted too. The upload runs in the background: the training loop waits only
while the folder's files are linked into a private staging folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tracking import catalog, layout, note, registry, spec
from tracking.catalog import LoggedCheckpoint
from tracking.commit import Describe, commit_local_files
from tracking.config import TrackingConfig
from tracking.download import download_files
from tracking.errors import NotFoundError, TrackingError, one_line
from tracking.manifest import Manifest, now, versions
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import AsyncSaver
from tracking.selection import Selector, find_checkpoint

__all__ = ["FORMAT", "TrackingCallback", "checkpoint_folder"]

FORMAT = "transformers"
# The Trainer's name for a checkpoint folder: checkpoint-<global step> (transformers.trainer_utils).
PREFIX = "checkpoint"
# Where the files of a save wait for their upload, inside output_dir: the Trainer's rotation only
# looks at checkpoint-* folders.
STAGING = ".tracking-staging"
# The manifest's rule for a stored file name (tracking.manifest): plain names, no folders.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# log_history keys that are positions, totals or timings, not metrics of the checkpoint.
_NOT_METRICS = frozenset({"epoch", "step", "total_flos"})
_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second")

_log = logging.getLogger(__name__)


@dataclass
class _Logged:
    """A checkpoint of the run whose folder this callback mirrors."""

    model_id: str
    artifact_uri: str
    epoch: int
    metrics: dict[str, float]


class TrackingCallback(TrainerCallback):  # type: ignore[misc]
    """Logs each checkpoint folder the Trainer saves as a checkpoint logged model of the MLflow run.

    The run is ``run_id``, else the active MLflow run (the one the Trainer's own MLflow
    integration starts, when ``report_to`` includes ``"mlflow"``). Needs
    ``save_strategy="epoch"``: checkpoints are keyed by epoch (``every_n_epochs`` saves only
    every N epochs, and the last). ``metric_for_best_model`` (``greater_is_better``) moves the
    run's best tag. ``async_upload=False`` commits before ``on_save`` returns. A failed upload
    raises at the next save or at the end of training. ``commands`` (``{run_id}`` filled in)
    add shell lines to the run's description, ``describe_run=False`` leaves it alone.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        every_n_epochs: int = 1,
        async_upload: bool = True,
        describe_run: bool = True,
        commands: Sequence[str] = (),
        config: TrackingConfig | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.run_id = run_id
        self.every_n_epochs = every_n_epochs
        self.describe_run = describe_run
        self.commands = tuple(commands)
        self._config = config
        self._saver = AsyncSaver() if async_upload else None
        self._handle: RunHandle | None = None
        # checkpoint folder -> the logged model of its files; epoch -> every committed checkpoint of the run.
        self._mirrored: dict[Path, _Logged] = {}
        self._noted: dict[int, note.NotedCheckpoint] = {}
        self._pending: list[Future[LoggedCheckpoint]] = []
        self._evaluated: tuple[int, dict[str, Any]] = (-1, {})

    # -- the Trainer's events --------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy != "epoch":
            raise ValueError(
                f"TrackingCallback keys checkpoints by epoch and needs TrainingArguments(save_strategy='epoch'), "
                f"got save_strategy={strategy!r}; set save_strategy='epoch' (and eval_strategy='epoch' for "
                "metrics per checkpoint)."
            )
        if not state.is_world_process_zero:
            return
        self._raise_failed()
        self._handle = open_run(target_run_id(self._run_id()), self._config)
        self._mirrored, self._noted = self._existing(self._handle, Path(str(args.output_dir)))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer saves every epoch; between due epochs it saves nothing, so its folders and
        # the run's logged models stay one to one.
        epoch = round(state.epoch or 0)
        last = state.global_step >= state.max_steps or epoch >= math.ceil(args.num_train_epochs)
        if control.should_save and not last and epoch % self.every_n_epochs != 0:
            control.should_save = False

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # What the Trainer ranks its best checkpoint by: the metrics as evaluate() returned them
        # (compute_metrics' and callbacks' additions included), which its log may lack.
        self._evaluated = (state.global_step, dict(metrics or {}))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        handle = self._handle
        if handle is None:
            raise RuntimeError("TrackingCallback.on_save before on_train_begin: add it to the Trainer's callbacks")
        self._raise_failed()  # a failed upload is never silent: the next save says so
        folder = Path(str(args.output_dir)) / f"{PREFIX}-{state.global_step}"
        if not folder.is_dir():
            raise NotFoundError(
                f"run {handle.run_id}: the Trainer saved no folder {folder}; TrackingCallback logs the folders "
                "Trainer._save_checkpoint writes (one trainer, no hyperparameter search)."
            )
        evaluated = [self._evaluated[1]] if self._evaluated[0] == state.global_step else []
        metrics = checkpoint_metrics([*state.log_history, *evaluated], state.global_step)
        monitor, mode = _monitor(args)
        manifest = Manifest(
            kind="checkpoint",
            format=FORMAT,
            files={},
            model=_describe_model(model),
            epoch=round(state.epoch or 0),
            step=state.global_step,
            metrics=metrics,
            optimizer=_describe_optimizer(optimizer, model),
            scheduler=_describe_scheduler(lr_scheduler),
            versions={**versions(), "transformers": transformers.__version__},
            created_at=now(),
        )
        staging = _stage(folder, Path(str(args.output_dir)) / STAGING, handle.run_id)
        files = {path.name: path for path in sorted(staging.iterdir())}
        watched = folder.resolve()

        def commit() -> LoggedCheckpoint:
            try:
                logged = commit_local_files(
                    handle,
                    manifest,
                    files,
                    monitor=monitor if monitor in metrics else None,
                    mode=mode,
                    describe=self._describer(handle, manifest, monitor) if self.describe_run else None,
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._committed(handle, watched, logged, monitor, mode)
            return logged

        if self._saver is None:
            commit()
        else:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._saver.submit(commit))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.wait()

    # -- flushing ----------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every checkpoint handed to the background upload is committed; re-raise a failure."""
        if self._saver is not None:
            self._saver.wait()

    def _raise_failed(self) -> None:
        if self._saver is not None:
            self._saver._raise_pending_error()

    # -- the run -----------------------------------------------------------------------------------

    def _run_id(self) -> str | None:
        if self.run_id is not None:
            return self.run_id
        import mlflow

        if mlflow.active_run() is None:
            raise ValueError(
                "TrackingCallback: no active MLflow run and no run_id; start one (`with mlflow.start_run():` "
                "around trainer.train(), or report_to='mlflow' for the Trainer's own) or pass run_id=..."
            )
        return None

    def _existing(
        self, handle: RunHandle, output_dir: Path
    ) -> tuple[dict[Path, _Logged], dict[int, note.NotedCheckpoint]]:
        """The run's committed checkpoints; those whose folder is in ``output_dir`` are mirrored from now on.

        A resumed training's Trainer rotates the folders it finds (the one materialised from the
        run among them), so their logged models follow the same rule as the ones logged here.
        """
        mirrored: dict[Path, _Logged] = {}
        noted: dict[int, note.NotedCheckpoint] = {}
        for epoch, stored in catalog.committed(handle).items():
            noted[epoch] = note.NotedCheckpoint(stored.model_id, stored.metrics)
            try:
                manifest = stored.read_manifest()
            except TrackingError:
                continue  # deleted since the search, or damaged: not ours to manage
            if manifest.format != FORMAT or manifest.step is None:
                continue
            folder = output_dir / f"{PREFIX}-{manifest.step}"
            if folder.is_dir():
                mirrored[folder.resolve()] = _Logged(stored.model_id, stored.artifact_uri, epoch, stored.metrics)
        return mirrored, noted

    def _describer(self, handle: RunHandle, manifest: Manifest, monitor: str | None) -> Describe:
        epoch = manifest.epoch
        assert epoch is not None

        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            gone = {m.epoch for folder, m in self._mirrored.items() if not folder.is_dir()}
            noted = {e: c for e, c in self._noted.items() if e not in gone}
            noted[epoch] = note.NotedCheckpoint(model_id, dict(manifest.metrics))
            by_model = {c.model_id: e for e, c in noted.items()}
            text = note.render(
                handle.run_id,
                model_class=str(manifest.model.get("class")),
                optimizer_class=(manifest.optimizer or {}).get("class"),
                checkpoints=noted,
                latest=by_model.get(tags.get(layout.TAG_LATEST, "")),
                best=by_model.get(tags.get(layout.TAG_BEST, "")),
                monitor=monitor,
                commands=[c.replace("{run_id}", handle.run_id) for c in self.commands],
                python=[
                    "from tracking.integrations.transformers import checkpoint_folder",
                    f'trainer.train(resume_from_checkpoint=checkpoint_folder("{handle.run_id}", '
                    "output_dir=args.output_dir))  # exact resume",
                ],
            )
            return {note.NOTE_TAG: text}

        return describe

    # -- retention -----------------------------------------------------------------------------------

    def _committed(
        self, handle: RunHandle, folder: Path, logged: LoggedCheckpoint, monitor: str | None, mode: str
    ) -> None:
        """Record the checkpoint just committed, then delete the logged models whose folder the Trainer rotated out."""
        epoch = logged.manifest.epoch
        assert epoch is not None and logged.model_id is not None and logged.artifact_uri is not None
        # A re-logged epoch replaced its earlier logged model (the commit deleted it).
        self._mirrored = {f: m for f, m in self._mirrored.items() if m.epoch != epoch}
        self._mirrored[folder] = _Logged(logged.model_id, logged.artifact_uri, epoch, dict(logged.manifest.metrics))
        self._noted[epoch] = note.NotedCheckpoint(logged.model_id, dict(logged.manifest.metrics))
        gone = {f: m for f, m in self._mirrored.items() if not f.is_dir()}
        if not gone:
            return
        try:
            handle.refresh_tags()
            registered = registry.versions_by_model(handle)
        except TrackingError as exc:
            _log.warning(
                "run %s: could not check the run before deleting %d checkpoint(s) the Trainer rotated out (%s); "
                "the next save retries.",
                handle.run_id,
                len(gone),
                one_line(exc)[:300],
            )
            return
        for folder_gone, doomed in sorted(gone.items(), key=lambda item: item[1].epoch):
            if doomed.model_id == handle.tags.get(layout.TAG_LATEST):
                # Still the run's latest: the save that rotated it out is uploading next, and its pass deletes it.
                continue
            if doomed.model_id in registered:
                _log.warning(
                    "run %s: the Trainer deleted %s, but its checkpoint (epoch %d, %s) is kept because registry "
                    "version %s points at it.",
                    handle.run_id,
                    folder_gone.name,
                    doomed.epoch,
                    doomed.model_id,
                    ", ".join(registered[doomed.model_id]),
                )
                del self._mirrored[folder_gone]
                continue
            try:
                if monitor is not None and handle.tags.get(layout.TAG_BEST) == doomed.model_id:
                    self._repoint_best(handle, doomed, monitor, mode)
                catalog.delete(handle, doomed.model_id, doomed.artifact_uri)
            except TrackingError as exc:
                _log.warning(
                    "run %s: could not delete checkpoint %s (epoch %d), whose folder the Trainer rotated out "
                    "(%s); the next save retries.",
                    handle.run_id,
                    doomed.model_id,
                    doomed.epoch,
                    one_line(exc)[:300],
                )
                continue
            del self._mirrored[folder_gone]
            self._noted.pop(doomed.epoch, None)

    def _repoint_best(self, handle: RunHandle, doomed: _Logged, monitor: str, mode: str) -> None:
        """Point the best tag at the best checkpoint still mirrored, before the one it names goes."""
        survivors = {
            m.epoch: m for f, m in self._mirrored.items() if f.is_dir() and m is not doomed and monitor in m.metrics
        }
        ranked = layout.best_first({e: m.metrics[monitor] for e, m in survivors.items()}, mode)
        if ranked:
            best = survivors[ranked[0]]
            handle.set_tags(
                {
                    layout.TAG_BEST: best.model_id,
                    layout.TAG_BEST_VALUE: repr(best.metrics[monitor]),
                    layout.TAG_MONITOR: monitor,
                    layout.TAG_MODE: mode,
                }
            )


def checkpoint_metrics(entries: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """The metrics of ``entries`` (the Trainer's log_history, and the last evaluation's) at global step ``step``,
    finite numbers only; a later entry's value wins."""
    metrics: dict[str, float] = {}
    for entry in entries:
        if entry.get("step", step) != step:
            continue
        for name, value in entry.items():
            if name in _NOT_METRICS or name.endswith(_TIMINGS):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                metrics[name] = float(value)
    return metrics


def _monitor(args: TrainingArguments) -> tuple[str | None, str]:
    """The metric that ranks checkpoints, as the Trainer names it in its eval logs, and min/max."""
    name = args.metric_for_best_model
    if not name:
        return None, "min"
    monitor = name if name.startswith("eval_") else f"eval_{name}"
    greater = args.greater_is_better
    if greater is None:
        greater = not name.endswith("loss")  # the Trainer's own default
    return monitor, "max" if greater else "min"


def _describe_model(model: nn.Module | None) -> dict[str, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the Trainer handed the callback no torch.nn.Module, got {type(model).__name__}")
    if callable(getattr(type(model), "from_pretrained", None)):
        # A PreTrainedModel is rebuilt by its own from_pretrained from the checkpoint's config.json.
        return {"class": spec.class_path(model), "init_kwargs": {}, "init_kwargs_source": "from_pretrained"}
    return spec.describe_model(model, None)


def _describe_optimizer(optimizer: Any, model: nn.Module | None) -> dict[str, Any] | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    if inner is None or model is None:
        return None
    try:
        return spec.describe_optimizer(inner, model)
    except ValueError:
        return None  # parameters outside the model: loading then needs optimizer=<factory>


def _describe_scheduler(scheduler: Any) -> dict[str, Any] | None:
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps torch's
    if inner is None:
        return None
    return spec.describe_scheduler(inner, None)


def _stage(folder: Path, root: Path, run_id: str) -> Path:
    """A private folder holding ``folder``'s files as hard links (copies where links fail).

    The Trainer's rotation may delete ``folder`` while its upload runs; the links keep the bytes.
    """
    for entry in folder.iterdir():
        if entry.name == layout.MANIFEST_FILE:
            continue
        if not entry.is_file():
            raise TrackingError(
                f"run {run_id}: {entry} is not a plain file; TrackingCallback logs flat checkpoint folders "
                "(one process's model, optimizer and scheduler files), not sharded states (DeepSpeed, FSDP)."
            )
        if not _FILE_NAME.fullmatch(entry.name):
            raise TrackingError(
                f"run {run_id}: {entry} has a name a manifest cannot list (letters, digits, '.', '_' and '-' only); "
                "rename what writes it."
            )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=root))
    try:
        for entry in folder.iterdir():
            if entry.name == layout.MANIFEST_FILE:
                continue  # a folder materialised from a run holds its manifest: the commit writes its own
            try:
                os.link(entry, staging / entry.name)
            except OSError:
                shutil.copy2(entry, staging / entry.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def checkpoint_folder(
    source: str,
    checkpoint: Selector = "latest",
    *,
    output_dir: str | os.PathLike[str],
    config: TrackingConfig | None = None,
) -> str:
    """A run's checkpoint as the Trainer's folder ``<output_dir>/checkpoint-<step>``, for ``resume_from_checkpoint``.

    ``source`` and ``checkpoint`` name it as in :func:`tracking.load` (a run ID with ``"latest"``,
    ``"best"`` or an epoch; ``models:/...``). Every file is checked against its sha256; a folder
    already there with the same files is used as it is, one with other content is overwritten.
    """
    located = find_checkpoint(source, checkpoint, config=config)
    manifest = located.manifest
    if manifest.format != FORMAT or manifest.step is None:
        raise NotFoundError(
            f"run {located.run_id}: {located.label} is a {manifest.format!r} checkpoint, not a Hugging Face Trainer "
            "folder; resume it with tracking.load(..., mode='train'), or pick a checkpoint TrackingCallback logged."
        )
    folder = Path(output_dir) / f"{PREFIX}-{manifest.step}"
    if folder.is_dir() and all(_matches(folder / name, f.size, f.sha256) for name, f in manifest.files.items()):
        return str(folder)
    download_files(located, folder, force=True)
    return str(folder)


def _matches(path: Path, size: int, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest() == sha256
