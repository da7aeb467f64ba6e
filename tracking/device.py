"""The device a load asks for (``map_location``): checked before anything is read, and a state moved onto it."""

from __future__ import annotations

from typing import Any

import torch

from tracking.errors import ConfigError


def check_map_location(map_location: Any) -> None:
    """A map_location torch cannot parse is the caller's mistake, said before anything is read."""
    if isinstance(map_location, dict) or callable(map_location):
        # torch.load's remapping forms: here every checkpoint is read on the host and only the weights,
        # optimizer state and scaler move, to one device, so the device they remap to is all a load needs.
        raise TypeError(
            f"map_location must be a device string or a torch.device, got a {type(map_location).__name__}: "
            "torch.load's remapping dict or function is not needed here, because a checkpoint is read on the host "
            "and its weights move to the one device named; pass that device ({'cuda:1': 'cuda:0'} -> 'cuda:0', "
            "lambda storage, loc: storage -> 'cpu')."
        )
    if not isinstance(map_location, str | torch.device):
        raise TypeError(f"map_location must be a device string or a torch.device, got {type(map_location).__name__}")
    try:
        torch.device(map_location)
    except RuntimeError as exc:
        raise ValueError(
            f"map_location={map_location!r} is not a device torch knows ({exc}); use 'cpu', 'cuda', 'cuda:0', "
            "'mps' or a torch.device."
        ) from None


def check_available(map_location: str | torch.device) -> None:
    """A map_location this machine lacks (no CUDA, ``cuda:1`` on one GPU, ``mps`` off a Mac) is a ConfigError
    that names what it has, said before torch.load would report it as a file it refused."""
    device = torch.device(map_location)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"map_location={map_location!r} but CUDA is not available here; use 'cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise ConfigError(
            f"map_location={map_location!r} but this machine has {count} CUDA "
            f"{'device' if count == 1 else 'devices'} (cuda:0 to cuda:{count - 1}); pass one of them, or 'cuda'."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"map_location={map_location!r} but MPS (Apple's GPU) is not available here; use 'cpu'.")


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` (tensors in nested dicts and lists) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value
