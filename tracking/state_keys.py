"""The keys of a stored state dict matched to a model's: the prefixes and segments module wrappers add to them, and
the tied tensors a stored state holds once.

A model wrapped as a whole (``torch.compile(model)``, ``DataParallel``) saves every key under one prefix; a module
holding a compiled submodule (``self.net = torch.compile(...)``) saves ``net._orig_mod.0.weight``; safetensors, and
a Hugging Face model's ``save_pretrained``, keep a tensor two names share (an LM head tied to its input embedding)
under one of them. A model built another way (not compiled, for evaluation on another machine) still takes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# What torch.compile's and (Distributed)DataParallel's wrappers put before each key of their state dict.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# The attribute torch.compile's wrapper keeps the compiled module under: a segment of each key below it.
_COMPILED = "_orig_mod"


def without_wrapper_prefix(state: Mapping[str, torch.Tensor], own: Iterable[str]) -> Mapping[str, torch.Tensor]:
    """``state`` with a wrapper's prefix taken off its keys when every key carries that one prefix and none of
    the model's keys ``own`` does: the state dict of the wrapper, not of the module it wraps, as versions before
    the library unwrapped models saved it, and as other tools do."""
    own = list(own)
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state) and not any(key.startswith(prefix) for key in own):
            stripped = OrderedDict(state)
            metadata = getattr(state, "_metadata", None)
            if metadata is not None:
                stripped._metadata = dict(metadata)  # type: ignore[attr-defined]
            # torch's own renaming: the keys and the per-module metadata (versions) that load_state_dict reads.
            consume_prefix_in_state_dict_if_present(stripped, prefix)
            return stripped
    return state


def uncompiled(key: str) -> str:
    """``key`` (of a state or a parameter) as the module names it with none of its submodules compiled."""
    return ".".join(part for part in key.split(".") if part != _COMPILED)


def with_model_keys(state: Mapping[str, Any], own: Iterable[str]) -> Mapping[str, Any]:
    """``state`` with its keys matched to the model's keys ``own``: a wrapper's prefix taken off, and each key the
    model lacks renamed to the model's key that differs from it by compiled submodules alone, either way."""
    own = set(own)
    state = without_wrapper_prefix(state, own)
    by_plain = {uncompiled(key): key for key in own}
    renamed = {key: key if key in own else by_plain.get(uncompiled(key), key) for key in state}
    if all(new == key for key, new in renamed.items()):
        return state
    moved: OrderedDict[str, Any] = OrderedDict((renamed[key], value) for key, value in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        # The per-module versions load_state_dict reads, under the model's module names.
        modules = {".".join(key.split(".")[:depth]) for key in own for depth in range(key.count(".") + 1)}
        # A module's own name wins over its compiled wrapper's (``net`` over ``net._orig_mod``).
        by_module = {uncompiled(name): name for name in sorted(modules, key=lambda name: uncompiled(name) == name)}
        moved._metadata = {by_module.get(uncompiled(k), k): v for k, v in metadata.items()}  # type: ignore[attr-defined]
    return moved


def with_tied_keys(state: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
    """``state`` with each key it lacks whose tensor the model shares with a key it holds given that key's value:
    the tied copy safetensors and ``save_pretrained`` leave out (which ``from_pretrained`` ties back itself)."""
    tensors = {name: id(t) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    held: dict[int, str] = {}
    for name, ident in tensors.items():
        if name in state:
            held.setdefault(ident, name)
    tied = {name: held[ident] for name, ident in tensors.items() if name not in state and ident in held}
    if not tied:
        return state
    filled: OrderedDict[str, Any] = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        filled._metadata = dict(metadata)  # type: ignore[attr-defined]
    for name, source in tied.items():
        filled[name] = state[source]
    return filled


def parameters_named(model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """The model's parameters of the recorded ``names``, a name recorded with or without compiled submodules
    (``net._orig_mod.0.weight``) finding the parameter of a model that compiles them otherwise; KeyError names the
    first name the model lacks."""
    named = dict(model.named_parameters())
    plain = {uncompiled(name): param for name, param in named.items()}
    found = []
    for name in names:
        param = named.get(name, plain.get(uncompiled(name)))
        if param is None:
            raise KeyError(name)
        found.append(param)
    return found
