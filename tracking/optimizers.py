"""Several optimizers in one checkpoint, by name: a GAN's generator and discriminator, an actor and a critic.

``optimizer=`` is one optimizer, or a mapping of names to optimizers (``scheduler=`` likewise, each scheduler
named as the optimizer it drives). One optimizer is stored as it always was: ``optim_state`` is its
``state_dict()`` and the manifest's ``optimizer`` its description. A mapping is stored as ``optim_state =
{name: state_dict()}`` (``scheduler_state`` likewise) and described under the manifest's ``optimizers`` and
``schedulers``, in format version 2: a reader older than the names refuses it, where it would otherwise load the
model and no optimizer. This module checks what a caller hands over and describes it, for the writing and the
reading side; :mod:`tracking.pairing` pairs the names a checkpoint holds with the ones a load or restore is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from tracking import spec

T = TypeVar("T")
R = TypeVar("R")

# One optimizer, or several by name (what log_checkpoint, Checkpointer.save and restore take).
Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]


def each(value: T | Mapping[str, T] | None, do: Callable[[T], R]) -> R | dict[str, R] | None:
    """``do(value)``, or ``{name: do(item)}`` for a mapping of names; None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {name: do(item) for name, item in value.items()}
    return do(value)


def _named(value: Any, role: str) -> dict[str, Any] | None:
    """The entries of ``value`` when it is a mapping of names (each a non-empty string), else None."""
    if not isinstance(value, Mapping):
        return None
    if not value:
        raise ValueError(f"{role}= is an empty mapping; pass None, one {role}, or a mapping of names to {role}s")
    for name in value:
        if not isinstance(name, str):
            raise TypeError(f"{role}= names must be strings, got the key {name!r} ({type(name).__name__})")
        if not name.strip():
            raise ValueError(f"{role}= names must be non-empty strings, got the key {name!r}")
    return dict(value)


def check(optimizer: Any, scheduler: Any, scheduler_kwargs: Any) -> None:
    """Raise TypeError or ValueError, naming the key, unless the arguments are one optimizer (or None) and one
    scheduler (or None; one only with an optimizer), or mappings of names: optimizers, and schedulers each named as
    the optimizer it drives. Whether one scheduler drives the very optimizer given is not checked: a framework's
    wrapped optimizer is not the object its scheduler holds."""
    optimizers = _named(optimizer, "optimizer")
    if optimizers is None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    else:
        for name, item in optimizers.items():
            if not isinstance(item, torch.optim.Optimizer):
                raise TypeError(f"optimizer[{name!r}] must be a torch.optim.Optimizer, got {type(item).__name__}")
        if len({id(item) for item in optimizers.values()}) < len(optimizers):
            raise ValueError(f"optimizer= names one optimizer twice ({sorted(optimizers)}); name each one once")
    schedulers = _named(scheduler, "scheduler")
    if schedulers is None:
        if scheduler_kwargs is not None and not isinstance(scheduler_kwargs, Mapping):
            raise TypeError(
                f"scheduler_kwargs= must be a mapping of the scheduler's init arguments, got {scheduler_kwargs!r}"
            )
        if scheduler is not None and optimizer is None:
            # Its state alone is of no use: a load rebuilds a scheduler over the optimizer it drives (none here),
            # and a scheduler restored without its optimizer's learning rates would step from the wrong ones.
            raise TypeError(
                f"scheduler= is one {type(scheduler).__name__} and optimizer= is None: a scheduler is saved and "
                "restored with the optimizer it drives; pass that optimizer as optimizer=, or scheduler=None"
            )
        if scheduler is not None and optimizers is not None:
            raise TypeError(
                f"optimizer= is a mapping of names, scheduler= is one {type(scheduler).__name__}: pass "
                f"scheduler={{name: scheduler}}, named as the optimizer it drives (one of {sorted(optimizers)})"
            )
        return
    if optimizers is None:
        raise TypeError("scheduler= is a mapping of names, optimizer= is not: pass optimizer={name: optimizer}")
    for name, item in schedulers.items():
        if name not in optimizers:
            raise ValueError(
                f"scheduler[{name!r}] has no optimizer of that name (optimizer= names {sorted(optimizers)}); "
                "name each scheduler as the optimizer it drives"
            )
        if not callable(getattr(item, "state_dict", None)):
            raise TypeError(f"scheduler[{name!r}] must be an LR scheduler, got {type(item).__name__}")
        driven = getattr(item, "optimizer", None)
        if driven is not None and driven is not optimizers[name]:
            raise ValueError(f"scheduler[{name!r}] drives another optimizer than optimizer[{name!r}]")
    if scheduler_kwargs is not None and (
        not isinstance(scheduler_kwargs, Mapping) or not set(scheduler_kwargs) <= set(schedulers)
    ):
        raise ValueError(
            f"with schedulers by name, scheduler_kwargs= maps some of their names {sorted(schedulers)} to "
            f"each one's init arguments, got {scheduler_kwargs!r}"
        )
    for name, kwargs in (scheduler_kwargs or {}).items():
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(
                f"scheduler_kwargs[{name!r}] must be a mapping of scheduler[{name!r}]'s init arguments, got {kwargs!r}"
            )


def check_factories(optimizer: Any, scheduler: Any) -> None:
    """Raise TypeError, naming the key, unless each is None, a callable, or a mapping of names to callables."""
    for role, factory in (("optimizer", optimizer), ("scheduler", scheduler)):
        for name, item in _entries(factory, role):
            if item is not None and not callable(item):
                raise TypeError(f"{_called(role, name)} must be a factory (a callable), got {item!r}")


def check_loadable(scheduler: Any, scaler: Any) -> None:
    """Raise TypeError, naming the key, unless each is None or has ``load_state_dict`` (schedulers: or by name)."""
    for role, target in (("scheduler", scheduler), ("scaler", scaler)):
        for name, item in _entries(target, role) if role == "scheduler" else [(None, target)]:
            if item is not None and not callable(getattr(item, "load_state_dict", None)):
                raise TypeError(
                    f"{_called(role, name)} must be an object with a load_state_dict method, got {type(item).__name__}"
                )


def _entries(value: Any, role: str) -> list[tuple[str | None, Any]]:
    named = _named(value, role)
    return [(None, value)] if named is None else list(named.items())


def _called(role: str, name: str | None) -> str:
    return role if name is None else f"{role}[{name!r}]"


def describe(model: nn.Module, optimizer: Any, scheduler: Any, scheduler_kwargs: Any) -> dict[str, Any]:
    """The manifest's fields for the optimizers and schedulers (``optimizer``, ``scheduler``, or ``optimizers``,
    ``schedulers`` and the format version that reads them). ``check`` has passed."""
    from tracking.manifest import NAMED_OPTIMIZERS_VERSION

    if not isinstance(optimizer, Mapping):
        return {
            "optimizer": spec.describe_optimizer(optimizer, model) if optimizer is not None else None,
            "scheduler": spec.describe_scheduler(scheduler, scheduler_kwargs) if scheduler is not None else None,
        }
    optimizers = {}
    for name, item in optimizer.items():
        try:
            optimizers[name] = spec.describe_optimizer(item, model)
        except ValueError as exc:
            raise ValueError(f"optimizer[{name!r}]: {exc}") from None
    kwargs = scheduler_kwargs or {}
    schedulers = {name: spec.describe_scheduler(item, kwargs.get(name)) for name, item in (scheduler or {}).items()}
    return {"optimizers": optimizers, "schedulers": schedulers or None, "format_version": NAMED_OPTIMIZERS_VERSION}
