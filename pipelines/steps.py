"""Where an epoch stands, so that a save in mid-epoch (``--checkpoint-every-steps``) resumes exactly.

A save in mid-epoch keeps the batches the epoch under way has taken and its running training sums (its
``train_loss`` and ``train_accuracy`` so far), beside the RNG states: the sampler's as the epoch began, the
others' as the save was taken. A resume draws that epoch's order again from the sampler's state and skips
the batches already taken (their indices only: no data is loaded and nothing runs through the model), so
its next batch is the one the run that never stopped trained on next.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

# The checkpoint's key (in ``extra``, under torchrun in each rank's ``rank_state``) for where the epoch stood.
KEY = "position"


@dataclass
class Position:
    """The batches the epoch under way has taken, and its running sums (the loop's own: tensors or numbers)."""

    batches: int = 0
    sums: dict[str, Any] = field(default_factory=dict)

    def saved(self) -> dict[str, Any]:
        """As a checkpoint keeps it: plain values and CPU tensors."""
        return {"batches": self.batches, "sums": {name: _host(value) for name, value in self.sums.items()}}

    @classmethod
    def read(cls, saved: Mapping[str, Any] | None) -> Position | None:
        """The position a checkpoint kept; None for a save at an epoch's end (and one from before positions)."""
        if not saved or not saved.get("batches"):
            return None
        return cls(int(saved["batches"]), dict(saved.get("sums", {})))


def _host(value: Any) -> Any:
    return value.detach().cpu().clone() if hasattr(value, "detach") else value


class BatchSampler(Iterable[list[int]], Sized, Protocol):
    pass


# Not a torch Sampler subclass (a DataLoader takes any sized iterable of batches): this module is imported
# by the pipelines' command lines, which answer --help without importing torch.
class SkippingBatches:
    """The batches of ``batches`` (a batch sampler), an epoch begun past its first ``skip`` once when set.

    The wrapped sampler draws the epoch's order as it always does (from the same generator, in the same
    calls), so a loader built on this one draws what a loader built on ``batches`` itself would.
    """

    def __init__(self, batches: BatchSampler) -> None:
        self.batches = batches
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)
