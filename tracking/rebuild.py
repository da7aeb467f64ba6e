"""Rebuilding a checkpoint's live objects: the model, optimizer and scheduler from their recorded classes (or the
caller's), and its state checked field by field before it is loaded into them.

:mod:`tracking.loader` finds and reads the checkpoint; this module turns its state into objects. Recorded classes
are checked to be Module / Optimizer / scheduler subclasses before they are called (:mod:`tracking.spec`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tracking import lightning_state, spec, state_keys, zerocopy
from tracking.errors import IntegrityError, MismatchError, NotFoundError, TrackingError, load_refusal
from tracking.located import Located

MODEL_HINT = "pass model=<an instance or a factory> to tracking.load"
OPTIMIZER_HINT = "pass optimizer=<a factory taking the model's parameters> to tracking.load"
SCHEDULER_HINT = "pass scheduler=<a factory taking the optimizer> to tracking.load"

ModelArg = nn.Module | Callable[[], nn.Module] | None


def checkpoint_state(located: Located, state: Any) -> dict[str, Any]:
    """``state`` once each of its fields is what tracking.log_checkpoint writes; else a refusal that names the field.

    A Lightning Trainer checkpoint (manifest format ``"lightning"``) is read as one: its ``state_dict``,
    optimizer and LR scheduler (several by name, as its manifest names them: ``{"0": ..., "1": ...}``),
    epoch and global step under the keys tracking.log_checkpoint uses; its other keys (loops, callbacks,
    hyper_parameters, ...) stay as extras.
    """
    if located.manifest.format == "lightning" and isinstance(state, dict):
        state = lightning_state.as_core_state(located, state)
    if not isinstance(state, dict) or "model_state" not in state:
        raise TrackingError(f"run {located.run_id}: {located.label} has no 'model_state' key; it is not a checkpoint.")
    model_state = state["model_state"]
    # Values are not all tensors in every state dict (a module's get_extra_state() may be any value).
    if not isinstance(model_state, Mapping) or not all(isinstance(k, str) for k in model_state):
        raise _bad_field(located, "model_state", f"is {_kind(model_state)}, not a state dict")
    _check_field(located, state, "optim_state", located.manifest.optimizers, _is_optimizer_state, "an optimizer's")
    _check_field(located, state, "scheduler_state", located.manifest.schedulers, _is_state, "a")
    _check_field(located, state, "scaler_state", None, _is_state, "a")
    return state


def _check_field(
    located: Located, state: dict[str, Any], key: str, named: Any, fits: Callable[[Any], bool], whose: str
) -> None:
    """Refuse ``state[key]`` unless it is one state dict that ``fits``, or, where the manifest records them by
    name (``named``), one for each of those names."""
    value = state.get(key)
    if value is None:
        return
    if named is None:
        if not fits(value):
            raise _bad_field(located, key, f"is {_kind(value)}, not {whose} state_dict()")
        return
    if not isinstance(value, Mapping) or sorted(value) != sorted(named):
        found = sorted(value) if isinstance(value, Mapping) else _kind(value)
        raise _bad_field(located, key, f"holds {found}, where its manifest names {sorted(named)}")
    for name, item in value.items():
        if not fits(item):
            raise _bad_field(located, f"{key}[{name!r}]", f"is {_kind(item)}, not {whose} state_dict()")


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("state"), Mapping)
        and isinstance(value.get("param_groups"), list)
    )


def refused_file(located: Located, name: str, exc: BaseException) -> TrackingError:
    """The error for a stored file that matches its manifest but that ``torch.load(weights_only=True)`` refused."""
    return TrackingError(
        f"run {located.run_id}: {located.label}: {name} matches its manifest but torch.load refused it "
        f"({load_refusal(exc)[:500]}). It holds objects other than tensors and plain Python values, which "
        "may be code: do not unpickle it. Load another checkpoint."
    )


def _kind(value: Any) -> str:
    return f"of type {type(value).__name__} ({str(value)[:60]!r})"


def _bad_field(located: Located, key: str, problem: str) -> IntegrityError:
    return IntegrityError(
        f"run {located.run_id}: {located.label}: the checkpoint's {key!r} {problem}; it was not written by "
        "tracking.log_checkpoint, or was edited. Load another checkpoint (checkpoint=<epoch>)."
    )


def load_field(located: Located, key: str, target: Any, value: Any) -> None:
    """``target.load_state_dict(value)``, a refusal named as the checkpoint's field ``key``, not a bare exception."""
    try:
        target.load_state_dict(value)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise MismatchError(
            f"run {located.run_id}: {located.label}: the checkpoint's {key!r} does not load into "
            f"{spec.class_path(target)} ({type(exc).__name__}: {str(exc)[:300]}); it is incomplete or of another "
            "class. Pass the object it was saved from, or load another checkpoint."
        ) from exc


# Per-parameter states that torch's optimizers keep in the shape of their parameter (others, such as
# Adafactor's row/column factors or LBFGS's flat history, have shapes of their own).
_PARAM_SHAPED = frozenset(
    {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_inf",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "sum",
        "ax",
        "prev",
        "step_size",
    }
)


def load_optimizer(
    located: Located, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any, key: str = "optim_state"
) -> None:
    """Load an optimizer state after checking that each saved per-parameter state fits the parameter it goes to.

    ``Optimizer.load_state_dict`` pairs saved and live parameters by position only: param groups
    recorded in another order (an edited manifest, a factory grouping otherwise) would hand one
    parameter's momentum to another without a word. ``key`` names the state in messages.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise MismatchError(
            f"run {located.run_id}: {located.label}: the checkpoint's {key!r} has {len(groups)} param groups, "
            f"the optimizer {len(optimizer.param_groups)}; {OPTIMIZER_HINT} that groups parameters as when saved."
        )
    for index, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise MismatchError(
                f"run {located.run_id}: {located.label}: param group {index} of the checkpoint's {key!r} does "
                f"not hold the {len(live['params'])} parameters of the optimizer's; {OPTIMIZER_HINT}."
            )
        for saved_id, param in zip(ids, live["params"], strict=True):
            entry = saved["state"].get(saved_id)
            for name, value in (entry or {}).items() if isinstance(entry, Mapping) else ():
                if name in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise MismatchError(
                        f"run {located.run_id}: {located.label}: the checkpoint's {key!r} holds {name} of shape "
                        f"{tuple(value.shape)} for parameter {names.get(id(param), '?')} of shape "
                        f"{tuple(param.shape)} (param group {index}): the optimizer's parameters are not grouped "
                        f"as when it was saved; {OPTIMIZER_HINT}."
                    )
    load_field(located, key, optimizer, saved)


def build_model(
    located: Located, model: ModelArg, map_location: str | torch.device, weights: Mapping[str, Any]
) -> nn.Module:
    """The model to load ``weights`` into, on ``map_location``: the one given (or a factory's), else rebuilt
    from its class in the floating-point dtype its weights were saved in (a bf16 model comes back bf16)."""
    run_id = located.run_id
    recorded = located.manifest.model
    built: Any
    if isinstance(model, nn.Module):
        built = model
    elif isinstance(model, type) and issubclass(model, nn.Module):
        name = model.__name__
        hint = (
            f"a class given as model= is built with the run's recorded arguments; pass model={name}(...) (an "
            f"instance) or model=lambda: {name}(...) (a factory) to tracking.load"
        )
        built = spec.build(model, (), recorded.get("init_kwargs") or {}, run_id=run_id, hint=hint)
    elif callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not a torch.nn.Module")
    elif model is not None:
        raise TypeError(f"model must be an nn.Module, an nn.Module class or a factory, got {model!r}")
    else:
        cls = spec.import_class(recorded["class"], "model", run_id=run_id, hint=MODEL_HINT)
        kwargs = recorded.get("init_kwargs")
        if kwargs is None:
            raise NotFoundError(
                f"run {run_id}: the init arguments of {recorded['class']} were not recorded, so the "
                f"model cannot be rebuilt from the run alone; {MODEL_HINT} (or log with "
                "@tracking.rebuildable / model_kwargs= next time)."
            )
        built = spec.build(cls, (), kwargs, run_id=run_id, hint=MODEL_HINT)
    if (model is None or isinstance(model, type)) and isinstance(weights, Mapping):
        saved = {v.dtype for v in weights.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        if len(saved) == 1:
            built = built.to(saved.pop())
    module: nn.Module = built.to(map_location)
    return module


def load_weights(
    located: Located,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    strict: bool,
    adopt: bool = False,
) -> bool:
    """Load ``state`` into ``model``; True when it adopted the tensors (``adopt``) instead of copying them."""
    own = model.state_dict()
    state = state_keys.with_tied_keys(state_keys.with_model_keys(state, own), model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: stored {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        raise MismatchError(
            f"run {located.run_id}: {located.label} does not fit {spec.class_path(model)}: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}; "
            f"shape mismatches {shapes or 'none'}. Build the model with the architecture that was "
            "logged" + ("" if shapes else ", or pass strict=False to load the keys that match") + "."
        )
    if adopt and zerocopy.adopt(model, state):
        return True
    model.load_state_dict(state, strict=strict)
    return False


def build_optimizer(
    located: Located,
    model: nn.Module,
    factory: Callable[..., torch.optim.Optimizer] | None,
    recorded: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> torch.optim.Optimizer:
    """The optimizer from ``factory``, else from its description: ``recorded`` (the manifest's ``optimizer``
    when None), the one named ``name`` of several. The factory of one optimizer is given the model's
    parameters; the factory of one of several, the parameters it trained, grouped as when saved."""
    run_id = located.run_id
    recorded = recorded if recorded is not None else located.manifest.optimizer
    hint = _hint(OPTIMIZER_HINT, name)
    which = "optimizer" if name is None else f"optimizer {name!r}"
    if factory is not None and name is None:
        return _built_by(factory, model.parameters())
    if not recorded:
        raise NotFoundError(f"run {run_id}: the manifest does not describe the {which}; {hint}.")
    try:
        groups = [{"params": state_keys.parameters_named(model, g["params"])} for g in recorded["param_groups"]]
    except KeyError as exc:
        raise MismatchError(
            f"run {run_id}: the {which} was trained over parameter {exc} which the model lacks; {hint}."
        ) from None
    if factory is not None:
        return _built_by(factory, groups)
    cls = spec.import_class(recorded["class"], "optimizer", run_id=run_id, hint=hint)
    # Checkpoints logged before the manifest kept only accepted defaults may hold others.
    defaults = spec.accepted(cls, recorded.get("defaults", {}))
    built = spec.build(cls, (groups,), defaults, run_id=run_id, hint=hint)
    return built  # type: ignore[no-any-return]


def _built_by(factory: Callable[..., torch.optim.Optimizer], parameters: Any) -> torch.optim.Optimizer:
    built = factory(parameters)
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory returned {type(built).__name__}, not an Optimizer")
    return built


def build_scheduler(
    located: Located,
    optimizer: torch.optim.Optimizer,
    factory: Callable[[torch.optim.Optimizer], Any] | None,
    recorded: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """The scheduler of ``optimizer`` from ``factory``, else from its description (as for build_optimizer)."""
    # Constructing a scheduler steps it once, which rewrites the optimizer's learning rates
    # (a factory's scheduler too); put the loaded values back, load_state_dict restores the rest.
    saved_groups = [dict(g) for g in optimizer.state_dict()["param_groups"]]
    if factory is not None:
        built = factory(optimizer)
    else:
        run_id = located.run_id
        recorded = (recorded if recorded is not None else located.manifest.scheduler) or {}
        hint = _hint(SCHEDULER_HINT, name)
        which = "scheduler" if name is None else f"scheduler {name!r}"
        if recorded.get("init_kwargs") is None:
            raise NotFoundError(
                f"run {run_id}: the {which} {recorded.get('class', '(unknown)')} cannot be rebuilt from "
                f"its manifest (its init arguments were not recorded); {hint}."
            )
        cls = spec.import_class(recorded["class"], "scheduler", run_id=run_id, hint=hint)
        built = spec.build(cls, (optimizer,), recorded["init_kwargs"], run_id=run_id, hint=hint)
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    return built


def _hint(hint: str, name: str | None) -> str:
    """``hint`` (``pass optimizer=<...> to tracking.load``) for the one of several named ``name``."""
    if name is None:
        return hint
    role, _, rest = hint.removeprefix("pass ").partition("=")
    factory, _, tail = rest.partition(">")
    return f"pass {role}={{{name!r}: {factory}>}}{tail}"
