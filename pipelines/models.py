"""The models the pipelines train; decorated so a run alone can rebuild them."""

from __future__ import annotations

import torch
from torch import nn

import tracking


@tracking.rebuildable
class Model(nn.Module):
    """Logistic regression on tabular features: one linear layer and a sigmoid."""

    def __init__(self, n_input_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_input_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


@tracking.rebuildable
class DigitsMLP(nn.Module):
    """A small MLP whose dropout and batch norm make train and eval mode differ."""

    def __init__(self, n_input_features: int = 64, hidden: int = 128, n_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_input_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]
