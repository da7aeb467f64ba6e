"""What a pipeline trains (:class:`Task`), and where its training stands (:class:`State`).

The training loop advances a :class:`State`; a new run builds one from the task, a
resumed run restores one from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


@dataclass(frozen=True)
class Task:
    """What a pipeline trains: its data, model, optimizer, schedule and objective."""

    name: str  # the pipeline's module, logged as the run's `pipeline` param
    dataset: str  # a key of pipelines.data.DATASETS, logged as the `dataset` param
    build_model: Callable[[int], nn.Module]  # number of input features -> model
    build_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]  # (parameters, lr)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, labels) -> mean loss
    predict: Callable[[torch.Tensor], torch.Tensor]  # outputs -> labels
    build_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None  # stepped once per epoch
    params: Mapping[str, Any] = field(default_factory=dict)  # fixed hyperparameters, logged as params
    defaults: Mapping[str, Any] = field(default_factory=dict)  # this pipeline's option defaults


@dataclass
class State:
    """The objects a training step changes, and the last epoch and global step it finished."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    epoch: int = 0
    step: int = 0
