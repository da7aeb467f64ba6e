"""What a load or restore gives back: the live objects, and the checkpoint's other entries beside them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tracking import layout
from tracking.located import Located
from tracking.manifest import Manifest
from tracking.parallel import distributed


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt into live objects; attributes are None where nothing was saved.

    A checkpoint of several optimizers by name fills ``optimizers`` and ``schedulers`` (dicts by name) in
    place of ``optimizer`` and ``scheduler``, which keep their one-object types for every other checkpoint.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    scaler: Any
    epoch: int | None
    step: int | None
    metrics: dict[str, float]
    run_id: str
    path: str
    manifest: Manifest
    extra: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    rank_state: Any = None  # this rank's own state, as log_checkpoint(rank_state=) took it
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)


_KNOWN = {
    "epoch",
    "model_state",
    "optim_state",
    "scheduler_state",
    "scaler_state",
    "step",
    "metrics",
    layout.RANK_STATE,
}


def loaded(
    located: Located,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None,
    scheduler: Any,
    scaler: Any,
    keep: Callable[[Any], Any] = lambda value: value,
) -> LoadedCheckpoint:
    """The result of a load or restore: the live objects, and ``keep``-s of the checkpoint's other entries."""
    named = optimizer if isinstance(optimizer, dict) else None  # several optimizers, by name
    return LoadedCheckpoint(
        model=model,
        optimizer=None if isinstance(optimizer, dict) else optimizer,
        scheduler=None if named else scheduler,
        scaler=scaler,
        epoch=state.get("epoch"),
        step=state.get("step"),
        metrics=dict(state.get("metrics") or located.manifest.metrics),
        run_id=located.run_id,
        path=located.label,
        manifest=located.manifest,
        extra={k: keep(v) for k, v in state.items() if k not in _KNOWN},
        model_id=located.model_id,
        rank_state=keep(_rank_entry(state.get(layout.RANK_STATE))),
        optimizers=named or {},
        schedulers=(scheduler or {}) if named else {},
    )


def _rank_entry(saved: Any) -> Any:
    """This rank's entry of a checkpoint's ``rank_state`` (a list by rank, or a dict by rank in a sharded one)."""
    rank = distributed.rank()
    if isinstance(saved, list):
        return saved[rank] if rank < len(saved) else None
    if isinstance(saved, dict):
        return saved.get(str(rank))
    return None
