"""The callback a Trainer is given: ``MLflowCheckpoints`` attaches the CheckpointIO mirror and keeps the RNG states.

It puts :class:`~tracking.integrations.lightning.mirror.MirrorIO` around the strategy's
``CheckpointIO`` (inside Lightning's ``AsyncCheckpointIO`` when there is one), takes what the main
thread knows at each save for the commit, keeps the RNG states in the checkpoint (its own callback
state), and raises a failed upload on every rank together.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from tracking import layout
from tracking.catalog import LoggedCheckpoint
from tracking.config import TrackingConfig
from tracking.integrations.lightning.description import SaveContext, save_context
from tracking.integrations.lightning.mirror import MirrorIO
from tracking.integrations.lightning.resume import RESUME_LINE
from tracking.parallel import distributed
from tracking.rng import capture_rng_state, restore_rng_state


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
        self._io: MirrorIO | None = None
        self._contexts: dict[tuple[int, int], SaveContext] = {}
        self._lock = threading.Lock()

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
            self._contexts[key] = save_context(trainer, pl_module)

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
