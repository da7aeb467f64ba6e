"""The value a checkpoint file holds: what it may contain, and how it is written to a store.

Whatever is saved must load with ``torch.load(f, weights_only=True)``, the only way the
project (and a careful user) reads it back. Python's pickle would happily save a numpy
scalar, a ``datetime`` or a ``Path`` that the weights-only loader then refuses: the
checkpoint would commit, move ``latest``, let retention delete the good ones, and never
load. So the value is checked before any byte is stored, and refused with the path of
the first offending item and how to convert it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from tracking.number import integral

# Types torch.load(weights_only=True) rebuilds (checked against torch 2.13; exact types:
# subclasses such as IntEnum, NamedTuple or defaultdict are refused by that loader).
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype, torch.device)
_TENSORS = (torch.Tensor, nn.Parameter)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)
# Deeper than any state dict: a structure this deep is a mistake, and deep enough ones make
# the loader fail with RecursionError.
MAX_DEPTH = 64
# Epochs and steps are stored as int64 (tensors, MLflow's metric steps).
MAX_INT64 = 2**63 - 1


def check_model(model: Any) -> None:
    """Raise TypeError unless ``model`` is a ``torch.nn.Module``: whatever a log stores comes from one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_int64(name: str, value: object) -> int:
    """``value`` (an epoch or step, called ``name``) as a plain int; ValueError unless it is a non-negative int64."""
    count = integral(value)
    if count is None or not 0 <= count <= MAX_INT64:
        raise ValueError(f"{name} must be a non-negative int of at most {MAX_INT64} (int64), got {value!r}")
    return count


def check_loadable(value: Any, name: str) -> None:
    """Raise ValueError unless ``value`` round-trips through ``torch.load(weights_only=True)``.

    ``name`` is how the value is called in the message (e.g. ``extra['history']``).
    """
    # (item, its path, the containers above it): iterative, so depth costs no Python stack.
    pending: list[tuple[Any, str, tuple[int, ...]]] = [(value, name, ())]
    while pending:
        item, where, above = pending.pop()
        kind = type(item)
        if kind in _LEAVES or kind in _TENSORS or _is_dtensor(kind):
            continue
        if kind not in _CONTAINERS:
            raise ValueError(
                f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
                f"cannot read back, so the checkpoint would never load. Store tensors and plain Python "
                f"values only: e.g. float(x) or int(x) for numpy scalars, torch.from_numpy(a) or a.tolist() "
                f"for arrays, str(x) for paths and dates, vars(ns) for an argparse.Namespace."
            )
        if id(item) in above:
            raise ValueError(f"{where} contains itself; a self-referencing structure cannot be saved.")
        if len(above) >= MAX_DEPTH:
            raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep; flatten it.")
        inside = (*above, id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if type(key) not in _LEAVES:
                    raise ValueError(f"{where} has a key of type {type(key).__qualname__}; use str or int keys.")
                pending.append((child, f"{where}[{key!r}]", inside))
        else:
            pending.extend((child, f"{where}[{i}]", inside) for i, child in enumerate(item))


def _is_dtensor(kind: type) -> bool:
    """A DTensor (FSDP2's shards): written by torch.distributed.checkpoint, never by torch.save."""
    if not issubclass(kind, torch.Tensor):
        return False
    from torch.distributed.tensor import DTensor

    return issubclass(kind, DTensor)


class TorchSave:
    """A store producer writing ``torch.save(value)``, whose tensors the upload may read in place.

    Their memory is ``stable`` while the store writes: a sync save blocks the training loop
    that would change them, and an async save owns a host copy.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, stream: BinaryIO) -> None:
        torch.save(self.value, stream)

    @property
    def stable(self) -> list[tuple[int, int]]:
        """The ``(address, end)`` memory ranges of the CPU tensors in the value."""
        ranges = []
        pending, seen = [self.value], set()
        while pending:
            item = pending.pop()
            if id(item) in seen:
                continue  # shared (or self-referencing) containers are walked once
            seen.add(id(item))
            if isinstance(item, torch.Tensor):
                if type(item) is torch.Tensor and item.device.type == "cpu" and item.layout == torch.strided:
                    storage = item.untyped_storage()
                    if storage.nbytes():
                        ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
            elif isinstance(item, Mapping):
                pending.extend(item.values())
            elif isinstance(item, list | tuple):
                pending.extend(item)
        return ranges
