"""The callback a Trainer is given: ``TrackingCallback`` commits each checkpoint folder the Trainer saves.

At each save the folder's files are staged (:mod:`~tracking.integrations.transformers.staging`) and
committed, in the background by default, as one logged model of the run; after each commit the
Trainer's rotation is mirrored (:mod:`~tracking.integrations.transformers.rotation`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tracking import catalog, layout, note
from tracking.catalog import LoggedCheckpoint
from tracking.commit import Describe, commit_local_files
from tracking.config import TrackingConfig
from tracking.errors import NotFoundError, TrackingError
from tracking.integrations.transformers.description import (
    FORMAT,
    checkpoint_metrics,
    describe_model,
    describe_optimizer,
    describe_scheduler,
    monitor_of,
)
from tracking.integrations.transformers.folders import PREFIX, resumed_folder, saved_model_only
from tracking.integrations.transformers.reporting import calling_handler, disarm, follow
from tracking.integrations.transformers.rotation import RotationMirror
from tracking.integrations.transformers.schedule import SaveSchedule, epochs_completed, unevaluated_saves
from tracking.integrations.transformers.staging import STAGING, clear, drop_if_empty, stage
from tracking.manifest import Manifest, now, versions
from tracking.parallel import distributed
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import AsyncSaver

_log = logging.getLogger(__name__)


class TrackingCallback(TrainerCallback):  # type: ignore[misc]
    """Logs each checkpoint folder the Trainer saves as a checkpoint logged model of the MLflow run.

    The run is ``run_id``, else the active MLflow run (the one the Trainer's own MLflow
    integration starts, when ``report_to`` includes ``"mlflow"``). ``save_strategy="steps"`` (the
    Trainer's default) keys each checkpoint by its global step (``checkpoint-step-00001500``; its
    manifest also records the epochs completed), ``save_strategy="epoch"`` by its epoch
    (``every_n_epochs`` saves only every N epochs, and the last: the schedule's, or where a callback such
    as ``EarlyStoppingCallback`` stops training); a run holds one kind, and other
    strategies are refused. ``metric_for_best_model`` (``greater_is_better``) moves the run's best
    tag; when the Trainer does not evaluate where it saves (its checkpoints then lack that metric), a
    warning says so as training starts. ``async_upload=False`` commits before ``on_save`` returns. A
    failed upload raises at the next save or at the end of training. ``commands`` (``{run_id}``
    filled in) add shell lines to the run's description, ``describe_run=False`` leaves it alone.

    Under torchrun (DDP) every rank has the callback: rank 0 alone talks to MLflow, each save's
    checkpoint holds every rank's RNG state (``rng_state_<rank>.pth``, sent to rank 0), and an
    error of rank 0 (opening the run, a save, an upload) is raised on every rank.
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
        self._schedule = SaveSchedule(every_n_epochs)
        self.run_id = run_id
        self.describe_run = describe_run
        self.commands = tuple(commands)
        self._config = config
        self.async_upload = async_upload
        # Made by each train() and closed at its end. The process's one background thread ends whenever no saver
        # has work, so a callback made per trial of a sweep leaves no thread, nor does a train() that raises (it has
        # no end the Trainer tells a callback of: a failed upload is logged once its uploads are done).
        self._saver: AsyncSaver | None = None
        self._handle: RunHandle | None = None
        self._rotation = RotationMirror()
        self._pending: list[Future[LoggedCheckpoint]] = []
        self._evaluated: tuple[int, dict[str, Any]] = (-1, {})

    @property
    def every_n_epochs(self) -> int:
        return self._schedule.every_n_epochs

    # -- the Trainer's events --------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._schedule.start(args)
        if self.async_upload and self._saver is None:
            self._saver = AsyncSaver(log_when_idle=True)
        handler = calling_handler()
        if handler is not None:  # after the Trainer's MLflowCallback, to disarm it once it ended its run
            follow(handler, self)
        # The coordination group is made by every rank at the same point, before any save needs it.
        distributed.prepare()

        def open_the_run() -> None:
            # An earlier train()'s uploads are done (a failure raised here): what staging holds now is a killed
            # process's, whose links keep rotated-out checkpoints on disk.
            self.wait()
            clear(Path(str(args.output_dir)) / STAGING)
            self._handle = open_run(target_run_id(self._run_id()), self._config)
            self._rotation.load(self._handle, Path(str(args.output_dir)))
            # The commit refuses a save keyed otherwise than the run's earlier ones; said here, before training.
            catalog.refuse_mixed_keys(self._handle, self._schedule.keyed_by)
            if state.global_step > 0:  # resumed: the Trainer restored its state from a checkpoint folder
                self._check_resume(args, state, self._handle)
            else:
                catalog.refuse_restart(self._handle, FORMAT, _from_latest(self._handle))
            unevaluated = unevaluated_saves(args, state)
            if unevaluated is not None:
                _log.warning(
                    "run %s: metric_for_best_model=%r ranks its checkpoints by %s, but %s. Evaluate where you save: "
                    "eval_strategy equal to save_strategy and, by steps, save_steps a multiple of eval_steps "
                    "(what the Trainer itself requires for load_best_model_at_end).",
                    self._handle.run_id,
                    args.metric_for_best_model,
                    monitor_of(args)[0],
                    unevaluated,
                )

        _on_process_zero(state, open_the_run)

    def _check_resume(self, args: TrainingArguments, state: TrainerState, handle: RunHandle) -> None:
        """Refuse a resume from before the run's latest (see :func:`tracking.catalog.refuse_rewind`); warn of one from
        a folder saved with ``save_only_model=True``, whose optimizer, schedule and RNG the Trainer starts afresh."""
        keyed_by = self._schedule.keyed_by
        resumed = state.global_step if keyed_by == layout.STEP else epochs_completed(state, keyed_by)
        catalog.refuse_rewind(handle, keyed_by, resumed, _from_latest(handle))
        # Where the Trainer resumed from: a folder anywhere (another output_dir, checkpoint_folder's), else the one
        # of its step in output_dir.
        folder = resumed_folder() or Path(str(args.output_dir)) / f"{PREFIX}-{state.global_step}"
        if saved_model_only(folder):
            _log.warning(
                "run %s: training resumes from %s, which holds the model alone (saved with "
                "TrainingArguments(save_only_model=True)): the Trainer restores the weights and starts the optimizer "
                "state, the LR schedule and the RNG states afresh, so training does not go on exactly where it "
                "stopped; save without save_only_model to resume exactly.",
                handle.run_id,
                folder,
            )

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._schedule.epoch_ended(args, state, control)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._schedule.epoch_began(state)

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
        self._schedule.evaluated(control)

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
        # Under DDP each rank writes its own RNG state into its own output_dir (another machine's disk,
        # maybe): rank 0 receives every rank's once that rank's part of the save is done, so the logged
        # checkpoint resumes every rank. A few KB each, over the coordination group.
        # A rank that cannot read its file sends why instead: raised on that rank alone, it would leave rank 0 in
        # this gather for good; rank 0 raises it for the whole job, in the one collective that follows anyway.
        try:
            own: dict[str, bytes] | str = self._own_files(args, state)
        except OSError as exc:
            own = f"rank {distributed.rank()} cannot read its RNG state {exc.filename or ''} ({exc.strerror or exc})"
        received = distributed.gather(own)

        def log() -> None:
            self._log(args, state, model, optimizer, lr_scheduler, _sent_files(self._handle, state, received or []))

        _on_process_zero(state, log)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        handler = calling_handler()
        if handler is not None:  # first: a failed upload raises below, and the Trainer's own run is ended already
            disarm(handler, self)

        def finish() -> None:
            self.wait()
            drop_if_empty(Path(str(args.output_dir)) / STAGING)

        try:
            _on_process_zero(state, finish)
        finally:
            self._stop_saver()

    # -- a save --------------------------------------------------------------------------------------

    @staticmethod
    def _own_files(args: TrainingArguments, state: TrainerState) -> dict[str, bytes]:
        """The files of this save only this rank wrote and rank 0 lacks: its RNG state (ranks other than 0)."""
        if not distributed.active() or state.is_world_process_zero:
            return {}
        name = f"rng_state_{args.process_index}.pth"  # Trainer._save_rng_state's name under several processes
        path = Path(str(args.output_dir)) / f"{PREFIX}-{state.global_step}" / name
        return {name: path.read_bytes()} if path.is_file() else {}

    def _log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: nn.Module | None,
        optimizer: Any,
        lr_scheduler: Any,
        received: Sequence[Mapping[str, bytes]],
    ) -> None:
        """Stage the save's folder (with the files the other ranks sent) and commit it, in the background by default."""
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
        monitor, mode = monitor_of(args)
        manifest = Manifest(
            kind="checkpoint",
            format=FORMAT,
            files={},
            model=describe_model(model),
            epoch=epochs_completed(state, self._schedule.keyed_by),
            step=state.global_step,
            keyed_by=self._schedule.keyed_by,
            metrics=metrics,
            optimizer=describe_optimizer(optimizer, model),
            scheduler=describe_scheduler(lr_scheduler),
            versions={**versions(), "transformers": transformers.__version__},
            created_at=now(),
        )
        others = {name: data for files in received for name, data in files.items()}
        staging = stage(folder, Path(str(args.output_dir)) / STAGING, handle.run_id, others)
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
                    # The Trainer's MLflowCallback logs the same keys (eval_loss, ...) at state.global_step.
                    chart_step=manifest.step,
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._rotation.committed(handle, watched, logged, monitor, mode)
            return logged

        if self._saver is None:
            commit()
        else:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._saver.submit(commit))

    # -- flushing ----------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every checkpoint handed to the background upload is committed; re-raise a failure."""
        if self._saver is not None:
            self._saver.wait()

    def _stop_saver(self) -> None:
        """Close the background saver (every upload is committed or failed by now); the next train() makes
        another."""
        saver, self._saver = self._saver, None
        if saver is not None:
            try:
                saver.close()
            except BaseException as exc:  # raised by wait() already, on every rank: not twice
                _log.debug("background upload error at close: %s", exc)

    def _raise_failed(self) -> None:
        if self._saver is not None:
            self._saver._raise_pending_error()

    # -- the run -----------------------------------------------------------------------------------

    def _run_id(self) -> str | None:
        if self.run_id is not None:
            return self.run_id
        import mlflow

        if mlflow.active_run() is None:
            if self._handle is not None:
                # An earlier train() logged to a run the Trainer's MLflowCallback started, and ended at its end.
                raise ValueError(
                    f"TrackingCallback: no active MLflow run for this train(); the one before logged to run "
                    f"{self._handle.run_id}, which the Trainer's own MLflow logging (report_to='mlflow') ended with "
                    f'it. Go on in it: `with mlflow.start_run(run_id="{self._handle.run_id}"):` around '
                    f"{_from_latest(self._handle)}, or train into a new run: `with mlflow.start_run():`."
                )
            raise ValueError(
                "TrackingCallback: no active MLflow run and no run_id; start one (`with mlflow.start_run():` "
                "around trainer.train(), or report_to='mlflow' for the Trainer's own) or pass run_id=..."
            )
        return None

    def _describer(self, handle: RunHandle, manifest: Manifest, monitor: str | None) -> Describe:
        key = manifest.key
        assert key is not None

        def describe(model_id: str, tags: Mapping[str, str]) -> dict[str, str]:
            noted = self._rotation.surviving()
            noted[key] = note.NotedCheckpoint(model_id, dict(manifest.metrics))
            resume = [
                "from tracking.integrations.transformers import checkpoint_folder",
                f'trainer.train(resume_from_checkpoint=checkpoint_folder("{handle.run_id}", '
                "output_dir=args.output_dir))  # exact resume",
            ]
            return note.describe_run(
                handle.run_id, manifest, noted, tags, monitor=monitor, commands=self.commands, python=resume
            )

        return describe


def _sent_files(
    handle: RunHandle | None, state: TrainerState, received: Sequence[Mapping[str, bytes] | str]
) -> list[Mapping[str, bytes]]:
    """The files each rank sent at a save (``received``, on rank 0); a rank that could not read its own sent why,
    raised here, naming the run, so that the ranks raise it together and none logs a checkpoint without it."""
    for sent in received:
        if isinstance(sent, str):
            run = f"run {handle.run_id}: " if handle is not None else ""
            raise TrackingError(
                f"{run}the save of step {state.global_step} is not logged: {sent}. Each rank's "
                "rng_state_<rank>.pth must be readable by its own process for a checkpoint to resume every rank; "
                "fix that rank's output_dir (permissions, disk), then resume from the run's latest checkpoint: "
                + (_from_latest(handle) if handle is not None else "checkpoint_folder(RUN_ID, output_dir=...)")
                + "."
            )
    return [sent for sent in received if not isinstance(sent, str)]


def _on_process_zero(state: TrainerState, step: Callable[[], object]) -> None:
    """``step`` on the Trainer's world process zero, its error raised on every rank: under DDP no rank is left
    waiting in the training loop's next collective for a rank 0 that failed."""
    error: BaseException | None = None
    if state.is_world_process_zero:
        try:
            step()
        except BaseException as exc:
            error = exc
    distributed.raise_together(error)


def _from_latest(handle: RunHandle) -> str:
    # How to resume the run's latest instead, said where a training would rewrite the run.
    return f'trainer.train(resume_from_checkpoint=checkpoint_folder("{handle.run_id}", output_dir=...))'
