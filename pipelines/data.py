"""The datasets the pipelines train on: scikit-learn's bundled copies, so nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

VAL_FRACTION = 0.2
# Fixed rather than --seed: every run of a dataset is validated on the same rows,
# so runs stay comparable and `pipelines.evaluate` can rebuild the split from the name alone.
SPLIT_SEED = 0

DATASETS: dict[str, Callable[..., Any]] = {"breast_cancer": load_breast_cancer, "digits": load_digits}


@dataclass(frozen=True)
class Split:
    """Standardised float32 features and int64 labels, for training and for validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def load(name: str) -> Split:
    """Dataset ``name`` split into train and validation, standardised with the train split's statistics."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    x, y = DATASETS[name](return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # digits has pixels that are blank in every training image

    def features(values: np.ndarray) -> torch.Tensor:
        return torch.tensor((values - mean) / std, dtype=torch.float32)

    def labels(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return Split(features(x_train), labels(y_train), features(x_val), labels(y_val))
