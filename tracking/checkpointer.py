"""A training loop's checkpoint policy: when to save, and which checkpoints to keep."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from tracking.checkpoint import (
    LoggedCheckpoint,
    check_metrics,
    checkpoint_dir,
    commit_checkpoint,
    committed_epochs,
    delete_checkpoint,
    read_manifest,
    snapshot_checkpoint,
)
from tracking.config import TrackingConfig
from tracking.run import TAG_BEST, TAG_BEST_VALUE, TAG_MODE, TAG_MONITOR, RunHandle, open_run, target_run_id


class Checkpointer:
    """Saves every ``every_n_epochs`` epochs and keeps the last N and the best K checkpoints.

    A checkpoint outside both sets is deleted from the store (manifest first, then
    data) right after the next one commits; the latest checkpoint is always kept, and
    the run's ``latest``/``best`` tags always point at checkpoints that exist.
    ``keep_last=None`` and ``keep_best=None`` together keep everything.
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
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self._run_id = run_id
        self._config = config
        self._handle: RunHandle | None = None
        # epoch -> monitored value (None when the checkpoint lacks it), for retention.
        self._kept: dict[int, float | None] | None = None

    def should_save(self, epoch: int) -> bool:
        return epoch % self.every_n_epochs == 0

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        epoch: int,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        **kwargs: Any,
    ) -> LoggedCheckpoint | None:
        """Log a checkpoint if ``epoch`` is due (or ``force``), then apply retention.

        ``kwargs`` go to :func:`tracking.log_checkpoint` (``scheduler``, ``scaler``, ``step``, ``extra``...).
        """
        if not (force or self.should_save(epoch)):
            return None
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
            **kwargs,
        )
        handle = self._open()
        kept = self._existing(handle)
        logged = commit_checkpoint(handle, snapshot)
        kept[epoch] = clean.get(self.monitor)
        self._apply_retention(handle, kept, latest=epoch)
        return logged

    def _open(self) -> RunHandle:
        if self._handle is None:
            self._handle = open_run(target_run_id(self._run_id), self._config)
        return self._handle

    def _existing(self, handle: RunHandle) -> dict[int, float | None]:
        # Read once per Checkpointer: a resumed run's earlier checkpoints count for retention too.
        if self._kept is None:
            self._kept = {}
            if self.keep_last is not None or self.keep_best is not None:
                for epoch in committed_epochs(handle):
                    metrics = read_manifest(handle, checkpoint_dir(epoch)).metrics
                    self._kept[epoch] = metrics.get(self.monitor)
        return self._kept

    def _ranked(self, kept: Mapping[int, float | None]) -> list[int]:
        scored = [e for e, v in kept.items() if v is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        # Ties go to the earlier epoch, which reached the value first.
        return sorted(scored, key=lambda e: (sign * float(kept[e] or 0.0), e))

    def _apply_retention(self, handle: RunHandle, kept: dict[int, float | None], latest: int) -> None:
        if self.keep_last is None and self.keep_best is None:
            return
        keep = {latest}
        if self.keep_last is not None:
            keep.update(sorted(kept)[-self.keep_last :])
        if self.keep_best is not None:
            keep.update(self._ranked(kept)[: self.keep_best])
        ranked = self._ranked({e: kept[e] for e in keep})
        if ranked and handle.tags.get(TAG_BEST) != checkpoint_dir(ranked[0]):
            # The best checkpoint fell out of the kept set: point the tag at the best survivor
            # before anything is deleted, so it never names a missing checkpoint.
            handle.set_tags(
                {
                    TAG_BEST: checkpoint_dir(ranked[0]),
                    TAG_BEST_VALUE: repr(kept[ranked[0]]),
                    TAG_MONITOR: self.monitor,
                    TAG_MODE: self.mode,
                }
            )
        for epoch in sorted(set(kept) - keep):
            delete_checkpoint(handle, epoch)
            del kept[epoch]

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the run handle; kept for symmetry with the asynchronous saver."""
        self._handle = None
