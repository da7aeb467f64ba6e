"""Train a logistic regression (`Model`: one linear layer and a sigmoid) on scikit-learn's breast-cancer data.

python -m pipelines.train --epochs 20
python -m pipelines.train --resume RUN_ID --epochs 40
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import training
from pipelines.models import Model
from pipelines.task import Task


def _loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(outputs.squeeze(1), labels.float())


def _predict(outputs: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(1) > 0.5).long()


def _sgd(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr)


TASK = Task(
    name="pipelines.train",
    dataset="breast_cancer",
    build_model=Model,
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
