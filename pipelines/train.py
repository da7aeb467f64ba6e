"""Train a logistic regression (`Model`: one linear layer and a sigmoid) on scikit-learn's breast-cancer data.

python -m pipelines.train --epochs 20
python -m pipelines.train --resume RUN_ID --epochs 40
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


def _model(n_features: int) -> nn.Module:
    from pipelines.models import Model

    return Model(n_features)


def _loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.binary_cross_entropy(outputs.squeeze(1), labels.float())


def _predict(outputs: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(1) > 0.5).long()


def _sgd(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(parameters, lr=lr)


TASK = Task(
    name="pipelines.train",
    dataset="breast_cancer",
    build_model=_model,
    build_optimizer=_sgd,
    loss=_loss,
    predict=_predict,
    params={"model": "Model", "optimizer": "SGD"},
    defaults={"epochs": 20, "lr": 0.1, "batch_size": 32},
)


def main(argv: Sequence[str] | None = None) -> int:
    return training.main(TASK, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
