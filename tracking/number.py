"""Epoch and step numbers: what a caller may pass as one.

No torch and no numpy here: the command line's selection reads numbers too, and imports neither.
"""

from __future__ import annotations

import operator


def integral(value: object) -> int | None:
    """``value`` as a plain int when it is an integer of any kind, else None.

    Loops hand over ``numpy.int64`` epochs and 0-d integer tensors (a trainer's global step) as often
    as ints: whatever ``operator.index`` takes counts, kept as the int it is, since a numpy scalar in
    a checkpoint would not load with ``torch.load(weights_only=True)``. A bool, of any kind, is none:
    ``epoch=True`` is a mistake, not epoch 1.
    """
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except (TypeError, RuntimeError, ValueError):
        return None  # a float, a string, a tensor of several elements


def plain(value: object) -> object:
    """``value`` as a plain int when it is an integer of any kind; anything else as it is, for the checks that
    refuse it to name it."""
    count = integral(value)
    return value if count is None else count
