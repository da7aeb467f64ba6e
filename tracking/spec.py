"""How a model, optimizer or scheduler is described in a manifest and rebuilt from it.

A description is a class path (``module:QualName``) plus JSON-serialisable init
arguments. Rebuilding looks the class up in a module that is already imported (or is
torch's own), never importing one because a manifest names it, and refuses anything
that is not a ``torch.nn.Module``, ``torch.optim.Optimizer`` or LR scheduler subclass
before it is called, so a tampered manifest naming ``os:system`` cannot run anything.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
import types
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from tracking.errors import NotFoundError, UnsafeClassError

# Attribute on a model instance holding the init arguments captured by @rebuildable.
INIT_KWARGS_ATTR = "_tracking_init_kwargs"

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


def rebuildable(cls: ModuleT) -> ModuleT:
    """Class decorator: remember the arguments each instance was constructed with.

    ``tracking.log_*`` record them in the manifest, so the loader can rebuild the
    model from the run alone::

        @tracking.rebuildable
        class Model(nn.Module):
            def __init__(self, n_input_features: int): ...
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"@rebuildable decorates torch.nn.Module subclasses, got {cls!r}")
    original = cls.__init__
    signature = inspect.signature(original)
    positional_only = [
        name
        for name, parameter in list(signature.parameters.items())[1:]
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    if positional_only:
        # The manifest records init arguments by name and the loader passes them so: the class logged, then
        # failed to rebuild ("got some positional-only arguments passed as keyword arguments").
        listed = ", ".join(repr(name) for name in positional_only)
        raise TypeError(
            f"@rebuildable records init arguments by name, but {cls.__qualname__}.__init__ takes {listed} "
            "positional-only (before '/'), which a rebuild cannot pass by name; drop the '/' from its signature, "
            "or leave the class undecorated and load with model=<instance or factory>."
        )

    @functools.wraps(original)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # Only the arguments of the instance's own class describe it: a base class's
        # arguments say nothing about how a subclass with its own __init__ is built.
        if type(self).__init__ is __init__:
            object.__setattr__(self, INIT_KWARGS_ATTR, _bind(signature, self, args, kwargs))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _bind(signature: inspect.Signature, self: Any, args: Any, kwargs: Any) -> dict[str, Any] | None:
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None  # *args cannot be replayed by keyword
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def class_path(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}:{cls.__qualname__}"


def is_json(value: Any) -> bool:
    """Whether ``value`` comes back from JSON as it went in (but for tuples, which come back as lists)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return _keys_are_strings(value)


def _keys_are_strings(value: Any) -> bool:
    # json.dumps writes an int key as a string: a model built with id2label={0: "cat"} came back with
    # {"0": "cat"}, and its lookups by class index failed, or found nothing, only once it was in use.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return False
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return True


def describe_model(model: nn.Module, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Class path and init kwargs of ``model``; ``init_kwargs`` is None when they are unknown."""
    from tracking.parallel.distributed import model_class

    cls = model_class(model)  # the user's class, not the subclass fully_shard makes
    kwargs: Mapping[str, Any] | None = model_kwargs
    source = "explicit"
    if kwargs is None:
        kwargs = getattr(model, INIT_KWARGS_ATTR, None)
        source = "rebuildable"
    if kwargs is None and _takes_no_arguments(cls):
        kwargs, source = {}, "no-arguments"
    if kwargs is not None and not is_json(dict(kwargs)):
        if model_kwargs is not None:
            raise ValueError(
                f"model_kwargs for {class_path(model)} must be JSON-serialisable, with string keys in every dict "
                f"(JSON turns others into strings), got {dict(model_kwargs)!r}"
            )
        kwargs = None
    note = None
    if kwargs is None:
        source = "unknown"
        note = (
            "init arguments were not captured: decorate the class with @tracking.rebuildable or pass "
            "model_kwargs=...; to load, pass model=<instance or factory>"
        )
    return {
        "class": class_path(cls),
        "init_kwargs": None if kwargs is None else dict(kwargs),
        "init_kwargs_source": source,
        **({"note": note} if note else {}),
    }


def _takes_no_arguments(cls: type) -> bool:
    # Only a constructor with no parameters at all: one with defaults may have been called
    # with other values, and rebuilding with the defaults would silently build another model.
    return len(inspect.signature(cls.__init__).parameters) == 1  # type: ignore[misc]


def describe_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """Class, defaults, and which named parameters sit in which param group."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        params = [names.get(id(p)) for p in group["params"]]
        if any(n is None for n in params):
            raise ValueError(
                "the optimizer holds parameters that are not in the model; log the model the optimizer trains"
            )
        groups.append({"params": params})
    return {
        "class": class_path(optimizer),
        # Only JSON-able hyperparameters can be replayed; load_state_dict restores the rest.
        "defaults": accepted(
            type(optimizer), {k: v for k, v in _jsonable(dict(optimizer.defaults)).items() if v is not _SKIP}
        ),
        "param_groups": groups,
    }


def accepted(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kwargs`` that ``cls.__init__`` takes by name: an optimizer's ``defaults`` may hold more
    (AdamW's hold ``decoupled_weight_decay``, which AdamW, unlike Adam, does not accept)."""
    parameters = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in parameters}


def describe_scheduler(scheduler: Any, scheduler_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Class and the init arguments that can be read back off the instance."""
    if scheduler_kwargs is not None:
        if not is_json(dict(scheduler_kwargs)):
            raise ValueError("scheduler_kwargs must be JSON-serialisable")
        return {"class": class_path(scheduler), "init_kwargs": dict(scheduler_kwargs)}
    kwargs: dict[str, Any] | None = {}
    params = list(inspect.signature(type(scheduler).__init__).parameters.values())[2:]
    for p in params:
        # last_epoch is restored by load_state_dict; constructing with it != -1 needs initial_lr.
        if p.name in {"last_epoch", "verbose"} or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(scheduler, p.name, inspect.Parameter.empty)
        if value is inspect.Parameter.empty:
            if p.default is inspect.Parameter.empty:
                kwargs = None
                break
            continue
        if not is_json(value):
            kwargs = None
            break
        assert kwargs is not None
        kwargs[p.name] = value
    return {"class": class_path(scheduler), "init_kwargs": kwargs}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if is_json(value) else _SKIP


_SKIP = object()


_ALLOWED_BASES: dict[str, tuple[type, ...]] = {
    "model": (nn.Module,),
    "optimizer": (torch.optim.Optimizer,),
    "scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
    "scaler": (torch.amp.GradScaler,),
}


def import_class(path: str, role: str, *, run_id: str, hint: str, allow_import: Collection[str] = ()) -> type:
    """Look up ``module:QualName`` and check it is a subclass allowed for ``role``.

    The module must already be imported, or be torch's own, or be named in
    ``allow_import`` (a module or a package whose submodules may be imported): importing
    a module runs its top-level code, so a manifest naming a module must not be enough to
    run it. The class check happens before anything is called, so a manifest naming
    ``os:system`` fails here without running.
    """
    if not isinstance(path, str):
        raise UnsafeClassError(
            f"run {run_id}: recorded {role} class {path!r} is not a string of the form module:QualName."
        )
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise UnsafeClassError(f"run {run_id}: recorded {role} class {path!r} is not of the form module:QualName.")
    module = sys.modules.get(module_name)
    if module is None:
        if not _may_import(module_name, allow_import):
            # NotFoundError, not UnsafeClassError: nothing says the class is unsafe, it is only
            # not available yet, and the user's next step is the same as for missing code.
            raise NotFoundError(
                f"run {run_id}: the {role} class {path} is in module {module_name!r}, which is not imported in "
                f"this process, and a module is never imported just because a manifest names it (that would "
                f"run its code). Import the module that defines the class before loading (e.g. "
                f"`import {module_name}`), or {hint}."
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise NotFoundError(
                f"run {run_id}: the {role} class {path} cannot be imported (module {module_name!r}: {exc}). "
                f"Install the code that defines it, or {hint}."
            ) from exc
    if "<locals>" in qualname.split("."):
        # Python names a class defined inside a function `function.<locals>.Class`: it exists only while that
        # function runs, and no module holds it. "The code changed since the run" sent users looking for a change.
        raise NotFoundError(
            f"run {run_id}: the {role} class {path} was defined inside a function (<locals>), so it cannot be looked "
            f"up by its name: {hint} (or define the class at the top level of its module for the runs you log next)."
        )
    obj: Any = module
    for part in qualname.split("."):
        obj = _attribute(obj, part)
        if obj is None:
            raise NotFoundError(
                f"run {run_id}: module {module_name!r} has no {qualname!r} (recorded {role} class {path}). "
                f"The code changed since the run; {hint}."
            )
    bases = _ALLOWED_BASES[role]
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        allowed = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
        raise UnsafeClassError(
            f"run {run_id}: refusing to instantiate {path} as the {role}: it is not a subclass of {allowed}. "
            "The manifest may have been tampered with."
        )
    return obj


def _attribute(obj: Any, name: str) -> Any:
    """``obj.name`` without importing anything: None when it is not there yet.

    A module's attribute is read from its ``__dict__``, never through ``getattr``: a package's
    ``__getattr__`` (or a lazy-loader entry such as ``mlflow.sklearn``) imports a submodule on
    first access, which would run a module because a manifest names it. A submodule counts only
    once it is really imported (in ``sys.modules``).
    """
    if isinstance(obj, types.ModuleType):
        found = vars(obj).get(name)
        if isinstance(found, types.ModuleType):
            return sys.modules.get(vars(found).get("__name__", ""))
        return found
    try:
        return getattr(obj, name, None)
    except Exception:  # a class's metaclass __getattr__ may raise anything for a name it lacks
        return None


def _may_import(module_name: str, allowed: Collection[str]) -> bool:
    # torch's own modules are trusted like torch itself, which is already imported here.
    return any(module_name == root or module_name.startswith(f"{root}.") for root in ("torch", *allowed))


def build(cls: type, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, run_id: str, hint: str) -> Any:
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise NotFoundError(
            f"run {run_id}: {class_path(cls)} no longer accepts the recorded arguments {dict(kwargs)!r} "
            f"({exc}); {hint}."
        ) from exc
    except (ValueError, RuntimeError, ArithmeticError, LookupError, AttributeError) as exc:
        # The recorded values (not the user's call) are what the constructor refused: an edited
        # manifest, or code whose checks changed since the run. Either way these arguments cannot
        # build it, and the caller can hand over an instance or a factory instead.
        raise NotFoundError(
            f"run {run_id}: {class_path(cls)} refused the recorded arguments {dict(kwargs)!r} "
            f"({type(exc).__name__}: {exc}); {hint}."
        ) from exc
