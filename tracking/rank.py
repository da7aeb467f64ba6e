"""Which process of a job speaks for it: what every rank reaches alike is said once, by rank 0.

Below ``tracking.parallel``, which builds on it, so that any module may ask without importing
upwards; and without importing torch, which the command line's reading side does not load. An
initialised process group says the rank; before one is made (or in a job whose ranks never make
one), torchrun's ``RANK`` variable does; without either, the process is a job of its own.
"""

from __future__ import annotations

import os
import sys
import warnings


def rank_zero() -> bool:
    """Whether this process is rank 0 of its job, or the only process of it."""
    # A process group exists only once torch.distributed is imported: no need to import it to ask.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return bool(dist.get_rank() == 0)
    value = os.environ.get("RANK", "").strip()
    return not value.isdecimal() or int(value) == 0


def warn_on_rank_zero(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn`` on rank 0 alone: said once for the job, not once per rank. ``stacklevel`` counts from
    the caller, as ``warnings.warn``'s does."""
    if rank_zero():
        warnings.warn(message, category, stacklevel=stacklevel + 1)
