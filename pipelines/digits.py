"""Train `DigitsMLP` (dropout, batch norm) on scikit-learn's 8x8 digits with Adam and a StepLR schedule.

python -m pipelines.digits --epochs 20
python -m pipelines.digits --resume RUN_ID --epochs 40 --monitor val_accuracy
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pipelines import training
from pipelines.task import Task

# torch is imported by the functions below, when they run: `--help` does not wait for it.
if TYPE_CHECKING:
    import torch
    from torch import nn

HIDDEN, DROPOUT = 128, 0.2
STEP_SIZE, GAMMA = 3, 0.5  # the learning rate halves every 3 epochs


def _model(n_features: int) -> nn.Module:
    from pipelines.models import DigitsMLP

    return DigitsMLP(n_features, hidden=HIDDEN, dropout=DROPOUT)


def _adam(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(parameters, lr=lr)


def _step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    import torch

    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=GAMMA)


def _cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(outputs, labels)


def _predict(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.argmax(dim=1)


TASK = Task(
    name="pipelines.digits",
    dataset="digits",
    build_model=_model,
    build_optimizer=_adam,
    build_scheduler=_step_lr,
    loss=_cross_entropy,
    predict=_predict,
    # Fixed hyperparameters: logged as params, so a resume notices when the code changed them.
    params={
        "model": "DigitsMLP",
        "hidden": HIDDEN,
        "dropout": DROPOUT,
        "optimizer": "Adam",
        "step_size": STEP_SIZE,
        "gamma": GAMMA,
    },
    defaults={"epochs": 20, "lr": 1e-3, "batch_size": 64},
)


def main(argv: Sequence[str] | None = None) -> int:
    return training.main(TASK, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
