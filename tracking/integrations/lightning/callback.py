"""The callback a Trainer is given: ``MLflowCheckpoints`` attaches the CheckpointIO mirror and keeps the RNG states.

It puts :class:`~tracking.integrations.lightning.mirror.MirrorIO` around the strategy's
``CheckpointIO`` (inside Lightning's ``AsyncCheckpointIO`` when there is one), takes what the main
thread knows at each save for the commit, keeps the RNG states in the checkpoint (its own callback
state), and raises a failed upload on every rank together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from tracking import catalog, layout
from tracking.catalog import LoggedCheckpoint
from tracking.config import TrackingConfig
from tracking.errors import one_line
from tracking.integrations.lightning.description import (
    HYPERPARAMETERS_FIX,
    SaveContext,
    check_hyperparameters,
    keying,
    save_context,
)
from tracking.integrations.lightning.mirror import MirrorIO
from tracking.integrations.lightning.resume import (
    RESUME_LINE,
    refuse_restart,
    refuse_resume,
    take_writers_states,
)
from tracking.parallel import distributed
from tracking.rng import capture_rng_state, restore_rng_state

_log = logging.getLogger(__name__)


class MLflowCheckpoints(pl.Callback):
    """Mirror ``ModelCheckpoint``'s checkpoints into MLflow as checkpoint logged models of the run.

    The run is the trainer's ``MLFlowLogger`` run when it has one, else ``run_id``, else the active MLflow
    run. Each saved file is a logged model keyed by its epoch (``checkpoint-epoch-0003``), or, when one of
    the trainer's ModelCheckpoints saves by step (``every_n_train_steps``, ``train_time_interval``, or after
    each of several validations an epoch), by its global step (``checkpoint-step-00001500``): then each save
    of an epoch stays, and an int given to :func:`~tracking.integrations.lightning.checkpoint_path` or
    ``tracking.load`` is a global step. ``background=True`` uploads on the library's background saver: the
    training loop waits only for Lightning's local save (with Lightning's ``AsyncCheckpointIO`` the upload
    runs in its thread instead). A failed upload is never silent: it raises from the save, from the next
    one, or at the end of ``fit`` (under DDP on every rank, at the next epoch or the end of fit).
    ``commands`` adds lines to the run's description (``{run_id}`` is replaced). The run's best pointer
    follows the ``monitor`` and ``mode`` of the ModelCheckpoint that wrote the file, or ``monitor=`` and
    ``mode=`` when given (with one ModelCheckpoint keeping the last N by step and another the best K).

    The checkpoint keeps the RNG states, and a fit resumed from it restores them, so that it draws the batches
    and dropout masks a fit that never stopped drew. ``restore_rng=False`` leaves them as the resumed fit finds
    them instead (seeded by you: ``pl.seed_everything(new_seed)`` before ``fit``), so that it draws from a new
    seed from the checkpoint on; its own checkpoints keep the states as ever.
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
        restore_rng: bool = True,
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
        self.restore_rng = restore_rng
        self._io: MirrorIO | None = None
        # How this fit's checkpoints are keyed ("epoch" or "step"): decided at its setup, for all of them.
        self.keyed_by: str | None = None
        # The RNG states a resumed fit restored, put back once more as it starts training (see on_train_start).
        self._restored_rng: dict[str, Any] | None = None
        self._contexts: dict[tuple[int, int], SaveContext] = {}
        self._lock = threading.Lock()
        # Whether this fit was checked for a fresh start into a run with checkpoints: at its first hook that can.
        self._restart_checked = False

    # --- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, _WrappingCheckpointIO):
            # AsyncCheckpointIO: the mirror goes inside, so it runs in its thread after the local write.
            # Its public setter ignores a new inner IO once one is configured: the attribute is set directly.
            inner = current.checkpoint_io
            if not isinstance(inner, MirrorIO):
                assert inner is not None
                self._io = MirrorIO(self, trainer, inner)
                current._checkpoint_io = self._io
            else:
                self._io = inner
        elif isinstance(current, MirrorIO):
            self._io = current
        else:
            self._io = MirrorIO(self, trainer, current)
            strategy.checkpoint_io = self._io
        self._io.trainer = trainer
        # The coordination group is made by every rank at the same point, before any save needs it.
        distributed.prepare()
        if stage == "fit":
            self._restart_checked = False
            self.keyed_by = keying(trainer)
            io, keyed_by, zero = self._io, self.keyed_by, trainer.is_global_zero

            def refuse() -> None:
                io.follow_run()
                handle = io.open()
                catalog.refuse_mixed_keys(handle, keyed_by)
                try:
                    check_hyperparameters(trainer, pl_module)
                except ValueError as exc:
                    raise ValueError(
                        f"run {handle.run_id}: the fit's checkpoints would not be uploaded: {exc} "
                        f"({HYPERPARAMETERS_FIX})"
                    ) from None

            # On the main thread: MLflow's active run is per thread, and a save may run in another one. A fit
            # keyed otherwise than the run's checkpoints, or whose checkpoints would not load, is refused now, on
            # every rank, not at its first save.
            distributed.on_rank0(lambda: refuse() if zero else None)
            if zero and not any(isinstance(c, ModelCheckpoint) for c in trainer.checkpoint_callbacks):
                # Nothing saves as the fit goes: the run would end with no checkpoint, and nothing would say why.
                _log.warning(
                    "run %s: the Trainer has no ModelCheckpoint (enable_checkpointing=False), so MLflowCheckpoints "
                    "logs no checkpoint as it trains, only what trainer.save_checkpoint(path) saves; keep "
                    "enable_checkpointing=True or add a ModelCheckpoint(...) to the callbacks.",
                    io.open().run_id,
                )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
        key = (int(checkpoint["epoch"]), int(checkpoint["global_step"]))
        with self._lock:
            self._contexts[key] = save_context(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            io, keyed_by, zero = self._io, self.keyed_by, trainer.is_global_zero
            # Before Lightning restores the optimizers and loops: a refused fit has not trained a batch.
            distributed.on_rank0(lambda: refuse_resume(io.open(), checkpoint, keyed_by) if zero and io else None)
        # Before the ModelCheckpoints load their states from it: Lightning runs them after the other callbacks.
        if self._io is not None:
            io = self._io
            epoch, step = int(checkpoint["epoch"]), int(checkpoint["global_step"])

            def taken() -> dict[str, Any]:
                states = checkpoint.get("callbacks")
                before = dict(states) if isinstance(states, dict) else {}
                take_writers_states(checkpoint, io.paths_of(epoch, step))
                return {key: state for key, state in (states or {}).items() if state is not before.get(key)}

            # Rank 0 alone knows the files it wrote (its mirror's paths): every rank takes the states it took. A
            # ModelCheckpoint whose top-k differs between ranks decides alone on one rank and in a collective on the
            # other (check_monitor_top_k), and the job hangs at its next save.
            taken_states = distributed.on_rank0(taken)
            if taken_states and isinstance(checkpoint.get("callbacks"), dict):
                checkpoint["callbacks"].update(taken_states)

    def state_dict(self) -> dict[str, Any]:
        # Kept in the checkpoint (its "callbacks"), so that a resumed fit draws what the straight run drew.
        own = capture_rng_state()
        if not distributed.active():
            return {"rng": own}
        # Under DDP the file holds rank 0's callback states alone: each rank's RNG goes in it too, or every resumed
        # rank would draw rank 0's numbers (ranks seeded apart would draw the same augmentations and dropout masks
        # from then on). Every rank builds the checkpoint (Lightning's dump_checkpoint), so every rank is here.
        return {"rng": own, "rng_by_rank": distributed.gather(own)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored while Lightning restores the checkpoint, before the fit loop makes its data iterator.
        if "rng" in state_dict and self.restore_rng:
            own = _rank_rng(state_dict)
            restore_rng_state(own)
            self._restored_rng = own

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every strategy but DeepSpeed's, FSDP's and ModelParallel's has restored the checkpoint by this hook: a fresh
        # fit is known here, before the logger logs its hyperparameters into the run and the sanity check runs the
        # module's validation. Those three restore after it: the sanity check's start, or training's, says.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._refuse_restart(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_restart(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_restart(trainer)  # when no sanity check ran
        restored, self._restored_rng = self._restored_rng, None
        if restored is not None and _resumes_the_saved_epochs_iterator(trainer):
            # Resumed within the saved epoch: the run that never stopped made this epoch's data iterator before the
            # save; the resumed fit made it since the restore, drawing from the RNG (the DataLoader's base seed). Put
            # back here, before Lightning goes past a validation due at the save (making its loader's iterator, as the
            # run that never stopped did after the save).
            restore_rng_state(restored)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree(wait=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree(wait=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A fit that raises calls no teardown hook of a callback: the uploads queued before it are finished here,
        # before Lightning's logger ends the run as failed, and the thread stopped, so that a sweep or notebook
        # catching the error keeps none. A failed upload is logged: raised, it would hide the fit's own error.
        if self._io is None:
            return
        try:
            self._io.flush()
            self._io.raise_pending()
        except BaseException as exc:
            if exc is not exception:
                _log.error(
                    "run %s: a checkpoint upload queued before the fit raised %s failed: %s; the run's latest "
                    "is the checkpoint committed before it.",
                    self._io.run_id(),
                    type(exception).__name__,
                    one_line(exc),
                )
        finally:
            self._io.stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._io is None:
            return
        try:
            if not distributed.active():  # under DDP every rank flushed together at on_train_end
                self._io.flush()
        finally:
            self._io.stop()

    # --- helpers ---------------------------------------------------------------------------

    def _refuse_restart(self, trainer: pl.Trainer) -> None:
        """Refuse, once a fit, a fit that resumes from no checkpoint into a run with Lightning checkpoints."""
        if self._restart_checked:
            return
        self._restart_checked = True
        # Once Lightning restored it, ``ckpt_path`` is the checkpoint this fit resumed from, None for a fresh one
        # (before, it still names the previous fit's). A second fit of the same Trainer (max_epochs raised in a
        # notebook) has none either, but goes on from the step its first reached, as Lightning keeps its loops:
        # not fresh. Judged inside on_rank0, called by every rank at the same hook: a rank seeing another path
        # than rank 0 cannot leave the others waiting.
        io, zero = self._io, trainer.is_global_zero
        fresh = trainer.ckpt_path is None and trainer.global_step == 0
        distributed.on_rank0(lambda: refuse_restart(io.open()) if zero and fresh and io else None)

    def context(self, epoch: int, step: int) -> SaveContext | None:
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


def _resumes_the_saved_epochs_iterator(trainer: pl.Trainer) -> bool:
    """Whether the data iterator a resumed fit made before training (Lightning's ``FitLoop.setup_data``) is the saved
    epoch's, which the run that never stopped made before the save, rather than the next epoch's, which it made after.

    It is the saved epoch's for a save before the epoch's last batch (by step), and for one after a validation on
    the last batch (``val_check_interval`` below 1, ``check_val_every_n_epoch`` above 1: ModelCheckpoint saves at the
    validation's end), where the resumed fit finishes that epoch on it and makes the next epoch's anew. A save at the
    end of the last batch (by step) or of the epoch is followed by the next epoch's iterator in both fits.
    """
    fit_loop = trainer.fit_loop
    if not fit_loop.epoch_loop.batch_progress.is_last_batch:
        return True
    return fit_loop.restarted_mid_epoch and not fit_loop.epoch_loop.restarted_on_train_batch_end


def _rank_rng(state_dict: dict[str, Any]) -> dict[str, Any]:
    """This rank's RNG states in a checkpoint's callback state: its own where the saving job had as many ranks, else
    the state of the same rank where there was one, else rank 0's (a checkpoint saved by one process holds that)."""
    by_rank = state_dict.get("rng_by_rank")
    if not isinstance(by_rank, list) or not by_rank:
        return dict(state_dict["rng"])
    rank, ranks = distributed.rank(), distributed.world_size()
    if len(by_rank) != ranks:
        distributed.warn(
            f"MLflowCheckpoints: the checkpoint holds the RNG states of {len(by_rank)} ranks, this fit runs on "
            f"{ranks}: each rank restores the states of the rank of its number where there is one, else rank 0's, "
            "so the resumed fit does not draw what a fit that never stopped drew; resume on the same number of ranks "
            "to go on exactly."
        )
    return dict(by_rank[rank] if rank < len(by_rank) else state_dict["rng"])
