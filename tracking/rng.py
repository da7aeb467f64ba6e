"""Random number generator states, captured into a checkpoint so a resumed run draws the same numbers.

States are stored as tensors and plain Python values, so checkpoints still load
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tracking.errors import MismatchError


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python ``random`` states, plus named generators.

    Pass e.g. ``{"sampler": loader_generator}`` for the generator a shuffling
    DataLoader draws its batch order from.
    """
    version, mt_state, gauss = random.getstate()
    np_kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`capture_rng_state` captured; ``generators`` must use the same names.

    The state's tensors may sit on any device (``tracking.load(..., map_location="cuda")`` gives
    them back on the CPU, ``torch.load`` as mapped): RNG states are set from host copies. CUDA
    states go to the GPUs that exist here; when their number differs from the saving job's, the
    common ones are restored and a warning says so. A generator the state holds no state for is
    refused before anything is restored.
    """
    saved = state.get("generators", {})
    missing = [name for name in generators or {} if name not in saved]
    if missing:
        raise MismatchError(
            f"the RNG state holds no generator named {', '.join(map(repr, missing))} (it holds: "
            f"{', '.join(map(repr, sorted(saved))) or 'none'}); pass the names given to capture_rng_state when it "
            "was saved, or leave the others out to keep their current state."
        )
    torch.set_rng_state(_host(state["torch"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            _host(npy["keys"]).numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    for name, generator in (generators or {}).items():
        generator.set_state(_host(saved[name]))
    if "cuda" in state:
        _restore_cuda(list(state["cuda"]))


def _restore_cuda(saved: list[Any]) -> None:
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here != len(saved):
        warnings.warn(
            f"the checkpoint holds the CUDA RNG states of {len(saved)} GPU(s) and {here} are visible here: "
            f"restoring {min(here, len(saved))}; a resumed run draws other numbers on the rest.",
            RuntimeWarning,
            stacklevel=3,
        )
    for device, rng in enumerate(saved[:here]):
        torch.cuda.set_rng_state(_host(rng), device)


def _host(value: Any) -> torch.Tensor:
    """A CPU tensor of ``value`` (a tensor on any device, or what numpy or a list holds)."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return tensor.detach().cpu()
