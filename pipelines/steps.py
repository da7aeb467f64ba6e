"""Where an epoch stands, so that a save in mid-epoch (``--checkpoint-every-steps``) resumes exactly.

A save in mid-epoch keeps the batches the epoch under way has taken and its running training sums (its
``train_loss`` and ``train_accuracy`` so far), beside the RNG states: the sampler's as the epoch began, the
others' as the save was taken. A resume draws that epoch's order again from the sampler's state and skips
the batches already taken (their indices only: no data is loaded and nothing runs through the model), so
its next batch is the one the run that never stopped trained on next.

The save keeps the size of those batches too: a resume with another ``--batch-size`` (``--override``) skips the
same samples, in batches of its own size, when they make a whole number of them (the epoch's order does not
depend on the batch size); else it is refused (:func:`pipelines.resume.resumed_position`).
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
    """The batches the epoch under way has taken, and its running sums (the loop's own: tensors or numbers);
    ``batch_size``, the size of those batches, as a checkpoint kept it (None: not known)."""

    batches: int = 0
    sums: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None

    def saved(self, batch_size: int) -> dict[str, Any]:
        """As a checkpoint keeps it, its batches taken ``batch_size`` samples each: plain values and CPU tensors."""
        sums = {name: _host(value) for name, value in self.sums.items()}
        return {"batches": self.batches, "batch_size": batch_size, "sums": sums}

    @classmethod
    def read(cls, saved: Mapping[str, Any] | None) -> Position | None:
        """The position a checkpoint kept; None for a save at an epoch's end (and one from before positions)."""
        if not saved or not saved.get("batches"):
            return None
        batches, sums = int(saved["batches"]), dict(saved.get("sums", {}))
        batch_size = saved.get("batch_size")
        if batch_size is None:
            # A save from before positions kept their batch size: every batch before a save in mid-epoch is whole
            # (the epoch's last one, maybe short, saves at its end), so the samples the sums counted tell it. The
            # loops count them as "seen" (one process) or as the third of their "totals" (a rank under torchrun).
            seen = sums["seen"] if "seen" in sums else sums["totals"][2] if "totals" in sums else None
            batch_size = None if seen is None else int(seen) // batches
        return cls(batches, sums, None if batch_size is None else int(batch_size))

    @property
    def samples(self) -> int | None:
        """The samples the epoch has taken (None: the batch size is not known)."""
        return None if self.batch_size is None else self.batches * self.batch_size

    def rebatched(self, batch_size: int) -> Position | None:
        """This position in batches of ``batch_size``: the same samples taken, as whole batches of that size;
        None when they are not a whole number of them. Itself when its batch size is that or not known."""
        samples = self.samples
        if samples is None or self.batch_size == batch_size:
            return self
        if samples % batch_size:
            return None
        return Position(samples // batch_size, self.sums, batch_size)


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
