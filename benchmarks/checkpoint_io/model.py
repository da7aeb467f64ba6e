"""The models the benchmark saves and loads: one sized to a target checkpoint, and the seed model."""

from __future__ import annotations

import math
from typing import Any, BinaryIO

import torch
from torch import nn

LAYERS = 8


def build_model(target_bytes: int) -> tuple[nn.Sequential, torch.optim.Adam]:
    """Linear layers sized so weights + Adam's two moments come to about ``target_bytes``.

    One optimizer step creates Adam's state; gradients are dropped, as after ``zero_grad``.
    """
    width = max(8, math.isqrt(target_bytes // (12 * LAYERS)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def new_adam(params: Any) -> torch.optim.Optimizer:
    """The optimizer factory ``tracking.load`` rebuilds ``build_model``'s optimizer with."""
    return torch.optim.Adam(params, lr=1e-3)


def seed_model() -> tuple[nn.Module, torch.optim.SGD]:
    """The user's own model (``Linear(6, 1)``) and optimizer: what fixed costs are measured on."""
    from pipelines.models import Model

    model = Model(6)
    return model, new_sgd(model.parameters())


def new_sgd(params: Any) -> torch.optim.SGD:
    """The optimizer factory ``tracking.load`` rebuilds ``seed_model``'s optimizer with."""
    return torch.optim.SGD(params, lr=0.1)


def checkpoint_dict(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
    """The seed notes' checkpoint, as the raw contenders save it."""
    return {"epoch": epoch, "model_state": model.state_dict(), "optim_state": optimizer.state_dict()}


def restore(data: BinaryIO | str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The seed notes' load, as the raw contenders do it: ``torch.load`` then both ``load_state_dict``."""
    state = torch.load(data, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optim_state"])
