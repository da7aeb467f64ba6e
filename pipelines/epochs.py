"""The epoch loop of a training run: one process's, or every rank's under ``torchrun``.

:mod:`pipelines.training` (one process) and :mod:`pipelines.parallel` (DDP, FSDP2) hand it what
differs between them: how an epoch trains, what each checkpoint carries, and which process leads.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipelines.steps import Position
from pipelines.task import State, Task, measure

if TYPE_CHECKING:
    import torch

    import tracking


def run_epochs(
    task: Task,
    state: State,
    epochs: int,
    checkpoints: tracking.Checkpointer,
    train_epoch: TrainEpoch,
    validation: tuple[torch.Tensor, torch.Tensor],
    carried: Callable[[int, Position | None], Mapping[str, Any]],
    lead: bool = True,
    resumed: Position | None = None,
) -> None:
    """Epochs ``state.epoch + 1 .. epochs`` of one process or one rank of many, each offered to ``checkpoints``.

    What differs between them comes in: ``train_epoch(epoch, start, after_step)`` trains an epoch (from
    ``start``, where a save in mid-epoch left it, when not None), calls ``after_step`` after each optimizer step,
    and returns its loss and accuracy (over every rank's batches); ``carried(epoch, position)`` the RNG states
    a checkpoint keeps (``extra`` or ``rank_state`` keyword arguments of ``save``, taken as it saves; ``position``
    for a save in mid-epoch), and ``lead`` whether this process logs to MLflow and shows progress (rank 0
    alone). Every rank saves: each writes its own part. ``resumed``: where the first epoch starts.

    A run saved every N steps (``checkpoints.every_n_steps``) charts by global step: each epoch's metrics at its
    last step, and a save in mid-epoch validates there and charts that with the epoch's training sums so far.
    """
    from pipelines import runs
    from pipelines.progress import EpochProgress

    first = state.epoch + 1
    by_step = checkpoints.every_n_steps is not None
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(EpochProgress(first, epochs)) if lead else None
        for epoch in range(first, epochs + 1):
            lr = float(state.optimizer.param_groups[0]["lr"])
            after_step = functools.partial(_mid_epoch, task, state, checkpoints, validation, carried, epoch, lr)
            train_loss, train_accuracy = train_epoch(epoch, resumed if epoch == first else None, after_step)
            metrics = _metrics(task, state, validation, train_loss, train_accuracy, lr)
            last = epoch == epochs
            chart = state.step if by_step else None
            if progress is not None:
                runs.log_epoch(checkpoints, epoch, metrics, last, chart)
                progress.update(epoch, metrics)
            checkpoints.save(
                state.model,
                state.optimizer,
                epoch=epoch,
                metrics=metrics,
                scheduler=state.scheduler,
                step=state.step,
                force=last,
                chart_step=chart,
                **carried(epoch, None),
            )


# Called after each optimizer step: the Position so far, the epoch's training loss and accuracy so far (every
# rank's: a collective under torchrun, asked only when a save is due), and whether it was the epoch's last batch.
AfterStep = Callable[[Position, Callable[[], tuple[float, float]], bool], None]
TrainEpoch = Callable[[int, Position | None, AfterStep], tuple[float, float]]


def _mid_epoch(
    task: Task,
    state: State,
    checkpoints: tracking.Checkpointer,
    validation: tuple[torch.Tensor, torch.Tensor],
    carried: Callable[[int, Position | None], Mapping[str, Any]],
    epoch: int,
    lr: float,
    position: Position,
    so_far: Callable[[], tuple[float, float]],
    final: bool,
) -> None:
    """The save in mid-epoch that ``checkpoints`` has due at this step, if any (every rank asks alike)."""
    # One due at the epoch's last batch is made at its end, after its validation, as a save by epoch is.
    if final or checkpoints.every_n_steps is None or not checkpoints.should_save(epoch - 1, state.step):
        return
    metrics = _metrics(task, state, validation, *so_far(), lr)
    state.model.train()  # validated in eval mode: the epoch goes on training
    checkpoints.save(
        state.model,
        state.optimizer,
        epoch=epoch - 1,  # the epochs completed, which a resume goes on after
        metrics=metrics,
        scheduler=state.scheduler,
        step=state.step,
        chart_step=state.step,
        **carried(epoch, position),
    )


def _metrics(
    task: Task,
    state: State,
    validation: tuple[torch.Tensor, torch.Tensor],
    train_loss: float,
    train_accuracy: float,
    lr: float,
) -> dict[str, float]:
    val_loss, val_accuracy = measure(task, state.model, *validation)
    return {
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "lr": lr,
    }
