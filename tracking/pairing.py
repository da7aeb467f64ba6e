"""Pairing a checkpoint's optimizers and schedulers with the ones a load or restore is given: one with one, or
by name (see :mod:`tracking.optimizers` for how several are stored), each state loaded into its own object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from tracking import pretrained, rebuild
from tracking.errors import MismatchError
from tracking.located import Located
from tracking.manifest import Manifest
from tracking.parallel import distributed


def names(manifest: Manifest, role: str) -> list[str] | None:
    """The names of a checkpoint's optimizers (``role`` "optimizer") or schedulers, None when it holds one or none."""
    named = manifest.optimizers if role == "optimizer" else manifest.schedulers
    return None if named is None else sorted(named)


def match(located: Located, role: str, given: Any, call: str) -> None:
    """Raise MismatchError unless ``given`` (what ``call`` was handed for ``role``: objects or factories) is
    shaped as the checkpoint's: one for one, a mapping for names; the same names for ``tracking.restore``, some of
    them for ``tracking.load`` (factories for those it cannot rebuild from their descriptions)."""
    saved = names(located.manifest, role)
    if given is None or (saved is None and not _holds(located, role)):
        return  # what the checkpoint holds none of is said by unheld, once for all of it
    where = _where(located)
    if saved is None and isinstance(given, Mapping):
        raise MismatchError(
            f"{where} holds one {role}, and {call} was given {role}s named {sorted(given)}; pass {role}=<one "
            f"{role}>, as it was saved."
        )
    if saved is not None and not isinstance(given, Mapping):
        kind = "factory" if call == "tracking.load" else type(given).__name__
        raise MismatchError(
            f"{where} holds {role}s named {saved}, and {call} was given one {kind}; pass "
            f"{role}={{name: {role}}} with the names {saved}."
        )
    if isinstance(given, Mapping) and saved is not None:
        exact = call == "tracking.restore"
        if (sorted(given) != saved) if exact else not set(given) <= set(saved):
            extra = "exactly" if exact else "some of"
            raise MismatchError(
                f"{where} holds {role}s named {saved}, and {call} was given {role}s named {sorted(given)}; "
                f"pass {role}= a mapping of {extra} the names {saved}."
            )


def unheld(located: Located, given: Mapping[str, Any], call: str) -> None:
    """Warn once (on rank 0 of a job, where every rank loads), naming the run and the checkpoint, when ``call`` was
    given an optimizer or scheduler (``given`` by role: objects, factories, or mappings of names) that the checkpoint
    holds no state for. It is left as it is, as a checkpoint saved without an optimizer has always restored the model
    alone; a training resumed from it would otherwise start that optimizer or schedule afresh without a word."""
    roles = [role for role, value in given.items() if value is not None and not _holds(located, role)]
    if not roles:
        return
    one = len(roles) == 1
    given_to = f"the {' and '.join(f'{role}=' for role in roles)} given to {call} {'is' if one else 'are'}"
    if call == "tracking.restore":
        outcome = f"{given_to} left as {'it is' if one else 'they are'}"
    else:
        outcome = f"{given_to} not used: " + " and ".join(f"the result's {role} is None" for role in roles)
    distributed.warn(
        f"{_where(located)} holds no {' or '.join(roles)} state (it was saved without {'one' if one else 'them'}): "
        f"{outcome}. Pass {' and '.join(f'{role}=None' for role in roles)} to load it as it was saved, or pick a "
        f"checkpoint saved with {'one' if one else 'them'} (checkpoint=<epoch>).",
        stacklevel=3,
    )


def driverless_scheduler(located: Located) -> None:
    """Warn, naming the run and the checkpoint, that a checkpoint saved with a scheduler and no optimizer (as
    ``log_checkpoint`` took it before it refused that) loads without its scheduler: there is no optimizer to
    rebuild it over. Its state is still there, for a scheduler of the caller's own."""
    distributed.warn(
        f"{_where(located)} holds a scheduler state and no optimizer state (it was saved with a scheduler and no "
        "optimizer): the result's scheduler is None, as there is no optimizer for it to drive. To load its state "
        "into a scheduler of yours, pass it with the optimizer it drives: tracking.restore(run_id, model, optimizer, "
        "scheduler, checkpoint=<its epoch>) (the optimizer is left as it is).",
        stacklevel=3,
    )


def _undescribed(located: Located, recorded: Any) -> bool:
    """A Lightning checkpoint's scheduler whose init arguments could not be read back at the save: left out of a
    load unless a factory for it is given (a LambdaLR's function, say, is no JSON)."""
    return located.manifest.format == "lightning" and (recorded or {}).get("init_kwargs") is None


def _where(located: Located) -> str:
    return f"run {located.run_id}: {located.label} ({located.store.describe(located.path(located.file))})"


def _holds(located: Located, role: str) -> bool:
    """Whether the checkpoint holds state for ``role``: described in its manifest (one, or by name), and for a
    framework's folder, in its files (a Trainer's ``save_only_model`` folder describes an optimizer it has not)."""
    manifest = located.manifest
    if pretrained.is_folder(located):
        wanted = [pretrained.OPTIMIZER_FILE] + ([pretrained.SCHEDULER_FILE] if role == "scheduler" else [])
        return all(name in manifest.files for name in wanted)
    if role == "optimizer":
        return manifest.optimizer is not None or manifest.optimizers is not None
    if role == "scaler":
        return manifest.scaler is not None
    return manifest.scheduler is not None or manifest.schedulers is not None


def load_into(located: Located, model: nn.Module, optimizer: Any, saved: Any) -> None:
    """Load the saved optimizer state (one, or one per name) into ``optimizer``, shaped the same (``match`` has
    passed)."""
    if isinstance(optimizer, Mapping):
        for name, item in optimizer.items():
            rebuild.load_optimizer(located, model, item, saved[name], key=f"optim_state[{name!r}]")
    else:
        rebuild.load_optimizer(located, model, optimizer, saved)


def load_schedulers(located: Located, scheduler: Any, saved: Any) -> None:
    """Load the saved scheduler state (one, or one per name) into ``scheduler``, shaped the same."""
    if isinstance(scheduler, Mapping):
        for name, item in scheduler.items():
            rebuild.load_field(located, f"scheduler_state[{name!r}]", item, saved[name])
    else:
        rebuild.load_field(located, "scheduler_state", scheduler, saved)


def build(located: Located, model: nn.Module, factory: Any) -> Any:
    """The checkpoint's optimizer, or ``{name: optimizer}``: each from its factory (``factory``, or the one of its
    name) when given, else from its description (``match`` has passed)."""
    named = located.manifest.optimizers
    if named is None:
        return rebuild.build_optimizer(located, model, factory, located.manifest.optimizer)
    factories = factory or {}
    return {
        name: rebuild.build_optimizer(located, model, factories.get(name), recorded, name=name)
        for name, recorded in sorted(named.items())
    }


def build_schedulers(located: Located, optimizer: Any, factory: Any, saved: Any) -> Any:
    """The checkpoint's scheduler (or ``{name: scheduler}`` of the ones ``saved`` holds), each over the optimizer
    of its name, with its state loaded. A Lightning checkpoint's scheduler whose init arguments could not be read
    back at the save is left out unless a factory of its name is given, as with one optimizer."""
    named = located.manifest.schedulers
    if named is None or not isinstance(optimizer, Mapping):
        if factory is None and _undescribed(located, located.manifest.scheduler):
            return None
        built = rebuild.build_scheduler(located, optimizer, factory, located.manifest.scheduler)
        rebuild.load_field(located, "scheduler_state", built, saved)
        return built
    factories = factory or {}
    out = {}
    for name, recorded in sorted(named.items()):
        if name not in factories and _undescribed(located, recorded):
            continue
        out[name] = rebuild.build_scheduler(located, optimizer[name], factories.get(name), recorded, name=name)
        rebuild.load_field(located, f"scheduler_state[{name!r}]", out[name], saved[name])
    return out
