"""Loading a checkpoint without copying its tensors: the one place that relies on torch internals.

Two tricks, each with a fallback, so that a torch upgrade has this one file to check
(run ``pytest tests/unit/test_zerocopy.py tests/unit/test_loader.py`` after one):

- :func:`load_sharing` is ``torch.load(weights_only=True)`` whose tensors are views of the
  downloaded buffer. It drives ``torch.serialization._load`` with ``overall_storage``, the
  path ``torch.load(mmap=True)`` takes; where this torch lacks it, a plain ``torch.load``.
- :func:`adopt` points a model's parameters at loaded tensors (as ``model.to()`` swaps
  ``.data``) where ``load_state_dict`` would be a plain copy; it reads ``nn.Module``'s
  private hook tables to know that, and declines (returns False) whenever in doubt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, BinaryIO, cast

import torch
from torch import nn

from tracking.storage import Buffer, BufferReader


def load_sharing(data: Buffer, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)`` whose CPU tensors are views of ``data`` rather than copies.

    This is torch.load's own ``mmap=True`` path (its ``_load`` with one storage over the
    whole file), fed the downloaded buffer instead of a mapped file: the same unpickler and
    checks, one copy of the checkpoint less in time and in peak memory. Falls back to a
    plain torch.load where this torch lacks that path.
    """
    serialization: Any = torch.serialization
    hooks = ("_load", "_open_zipfile_reader", "_weights_only_unpickler")
    zip_archive = bytes(data[:4]) == b"PK\x03\x04"
    if not isinstance(data, bytes) and zip_archive and all(hasattr(serialization, h) for h in hooks):
        storage = torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
        with serialization._open_zipfile_reader(BufferReader(data)) as archive:
            return serialization._load(
                archive,
                map_location,
                serialization._weights_only_unpickler,
                overall_storage=storage,
                encoding="utf-8",
            )
    return torch.load(cast(BinaryIO, BufferReader(data)), map_location=map_location, weights_only=True)


# Modules whose load_state_dict is a plain copy of each key into the tensor of that name.
_PLAIN_LOADERS = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict)


def adopt(model: nn.Module, state: Mapping[str, Any]) -> bool:
    """Point the model's parameters and buffers at the loaded tensors instead of copying into them.

    As ``model.to()`` does, each tensor's ``.data`` is swapped, so the Parameter objects (and any
    reference to them) stay the same. Done only where ``load_state_dict`` would be a plain copy:
    no custom loading code or hooks, every key present, and the same dtype, device, shape and
    strides; otherwise nothing is changed and False is returned.
    """
    targets: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        plain = type(module)._load_from_state_dict in _PLAIN_LOADERS
        custom_extra = type(module).set_extra_state is not nn.Module.set_extra_state
        if not plain or custom_extra or module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            return False
        persistent = [
            *module._parameters.items(),
            *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set),
        ]
        for name, tensor in persistent:
            if tensor is not None:
                targets[f"{prefix}.{name}" if prefix else name] = tensor
    if set(targets) != set(state):
        return False
    # Tensors stored once (tied when saved) must stay tied only where the model ties them too.
    owners: dict[int, int] = {}
    for key, tensor in targets.items():
        loaded = state[key]
        if not (
            type(loaded) is torch.Tensor
            and owners.setdefault(loaded.untyped_storage().data_ptr(), id(tensor)) == id(tensor)
            and loaded.dtype == tensor.dtype
            and loaded.device == tensor.device
            and loaded.shape == tensor.shape
            and loaded.stride() == tensor.stride()
            and loaded.layout == torch.strided
        ):
            return False
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.data = state[key]
    return True
