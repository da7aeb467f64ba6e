"""The epoch loop of a training run: one process's, or every rank's under ``torchrun``.

:mod:`pipelines.training` (one process) and :mod:`pipelines.parallel` (DDP, FSDP2) hand it what
differs between them: how an epoch trains, what each checkpoint carries, and which process leads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipelines.task import State, Task, measure

if TYPE_CHECKING:
    import torch

    import tracking


def run_epochs(
    task: Task,
    state: State,
    epochs: int,
    checkpoints: tracking.Checkpointer,
    train_epoch: Callable[[int], tuple[float, float]],
    validation: tuple[torch.Tensor, torch.Tensor],
    carried: Callable[[int], Mapping[str, Any]],
    lead: bool = True,
) -> None:
    """Epochs ``state.epoch + 1 .. epochs`` of one process or one rank of many, each offered to ``checkpoints``.

    What differs between them comes in: ``train_epoch(epoch)`` trains an epoch and returns its loss and
    accuracy (over every rank's batches), ``carried(epoch)`` the RNG states a checkpoint keeps (``extra`` or
    ``rank_state`` keyword arguments of ``save``, taken as it saves), and ``lead`` whether this process
    logs to MLflow and shows progress (rank 0 alone). Every rank saves: each writes its own part.
    """
    from pipelines import runs
    from pipelines.progress import EpochProgress

    first = state.epoch + 1
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(EpochProgress(first, epochs)) if lead else None
        for epoch in range(first, epochs + 1):
            lr = float(state.optimizer.param_groups[0]["lr"])
            train_loss, train_accuracy = train_epoch(epoch)
            val_loss, val_accuracy = measure(task, state.model, *validation)
            metrics = {
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": lr,
            }
            last = epoch == epochs
            if progress is not None:
                runs.log_epoch(checkpoints, epoch, metrics, last)
                progress.update(epoch, metrics)
            checkpoints.save(
                state.model,
                state.optimizer,
                epoch=epoch,
                metrics=metrics,
                scheduler=state.scheduler,
                step=state.step,
                force=last,
                **carried(epoch),
            )
