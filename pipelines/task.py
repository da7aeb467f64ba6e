"""What a pipeline trains (:class:`Task`), where its training stands (:class:`State`), how it is measured.

The training loop advances a :class:`State`; a new run builds one from the task, a
resumed run restores one from a checkpoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# No torch at import: a pipeline describes its Task before parsing its command line, and
# `--help` must not wait for torch (the functions below import it when they run).
if TYPE_CHECKING:
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


def measure(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on ``(x, y)`` in eval mode (no dropout, batch norm's running stats)."""
    import torch

    model.eval()
    with torch.no_grad():
        outputs = model(x)
        return task.loss(outputs, y).item(), (task.predict(outputs) == y).float().mean().item()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CUDA's too) global RNGs; on a GPU, also choose deterministic
    kernels, so that a resumed run repeats the uninterrupted one bit for bit there as on the CPU."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # cuBLAS reads this when it makes its first handle: before the first matmul on the GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
