"""What a resume from a Hugging Face Trainer's checkpoint folder refuses, before anything is touched: a run saved
by another number of ranks (:func:`check_ranks`), and another ``--seed`` or ``--batch-size`` the Trainer would not
go on from with the samples the epoch had left (:func:`check_samples_left`), listing the batch sizes that would
(:func:`batch_sizes_for`). :mod:`pipelines.hf_digits` runs them as it settles the run to resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_ranks(located: Any, world: int, pipeline: str) -> None:
    """Refuse a resume on ``world`` ranks from ``located``, a checkpoint folder saved by another number of them;
    ``pipeline``, the one whose command the refusal gives to resume it as it was saved.

    The Trainer splits an epoch's batches among the ranks and counts the epochs trained, and the batches it skips,
    in steps of one rank's share: on another number it would go on at another place in another epoch (a run of 2
    ranks at epoch 4's end, step 48 of 12 an epoch, went on in one process after 2 batches of epoch 3, of 23 steps
    an epoch), and each rank restores the RNG state of its own file, which another number of ranks does not find.
    The ranks that saved it are told by those files: ``rng_state_<rank>.pth`` from each of 2 ranks or more,
    ``rng_state.pth`` in one process (a folder that does not tell, saved without its RNG states or missing a rank's,
    is let go on)."""
    import re

    from pipelines import runs

    files = located.manifest.files
    ranks = sorted(int(found.group(1)) for name in files if (found := re.fullmatch(r"rng_state_(\d+)\.pth", name)))
    saved = len(ranks) if len(ranks) > 1 and ranks == list(range(len(ranks))) else None
    if not ranks and "rng_state.pth" in files:
        saved = 1
    if saved is None or saved == world:
        return
    run_id = located.run_id
    saved_by = f"{saved} ranks" if saved > 1 else "one process"
    runs_on = f"on {world} ranks" if world > 1 else "in one process"
    launch = f"torchrun --nproc-per-node {saved} -m {pipeline}" if saved > 1 else f"python -m {pipeline}"
    raise runs.PipelineError(
        f"run {run_id}: its checkpoint at step {located.manifest.step} was saved by {saved_by}, and this resume runs "
        f"{runs_on}: the Trainer would split an epoch into other batches per rank and count the epochs trained in "
        "those, going on at another place in another epoch, without the ranks' RNG states. Resume it as it was "
        f"saved: `{launch} --resume {run_id} ...`."
    )


def check_samples_left(
    located: Any, values: Mapping[str, Any], changed: Mapping[str, Any], rows: int, world: int
) -> None:
    """Refuse a resume from ``located`` (a checkpoint folder of ``rows`` training rows, saved by ``world`` ranks)
    that the Trainer would not go on from with the samples its epoch had left. It counts the epochs and the
    batches trained (and skips those) in optimizer steps of the batch size it trains with now, and draws the
    epoch's order from the seed: from a save in mid-epoch, another ``--seed`` or ``--batch-size`` (``--override``)
    would train some samples twice or never; from one at an epoch's end, a batch size that makes an epoch another
    number of steps would go on at another place in another epoch."""
    import json
    import math

    import torch

    from pipelines import parallel, resume, runs
    from pipelines.steps import Position

    if "seed" not in changed and "batch_size" not in changed:
        return  # the Trainer's own resume goes on exactly
    state = json.loads(bytes(located.read("trainer_state.json")))
    step = int(state["global_step"])
    # The Trainer's batch is one process's: one device's batch on each of its GPUs (nn.DataParallel) when it runs
    # without torchrun on several.
    devices = torch.cuda.device_count() if torch.cuda.is_available() and not parallel.launched() else 1
    batch_size = values["batch_size"] * max(1, devices)
    size = int(state.get("train_batch_size") or batch_size)
    # As the Trainer's loader splits the batches among the ranks (accelerate's BatchSamplerShard, even_batches).
    steps = {b: math.ceil(math.ceil(rows / b) / world) for b in (size, batch_size)}
    # The Trainer's epoch is a float (1.5 half way into the second); rounded as the callback rounds it.
    epochs = round(float(state.get("epoch") or 0.0), 6)
    if epochs % 1:
        completed = math.floor(epochs)
        where = resume.mid_epoch(located.run_id, completed, step)
        if "seed" in changed:
            raise resume.another_order(where, values["seed"])
        if batch_size != size:
            taken = Position(step - completed * steps[size], batch_size=size)
            why = f"which the Trainer would skip as {taken.batches} batches of {batch_size}"
            raise resume.other_batches(where, taken, why, "or resume from a save at an epoch's end")
    elif steps[batch_size] != steps[size]:
        raise runs.PipelineError(
            f"run {located.run_id}: its checkpoint at step {step} ends epoch {int(epochs)} of {steps[size]} steps in "
            f"batches of {size}; in batches of {batch_size} an epoch is {steps[batch_size]} steps, and the Trainer "
            "counts the epochs trained in those: it would go on at another place in another epoch, training some "
            f"samples twice or never. Keep the checkpoint's --batch-size {size}, or pass one that makes an epoch "
            f"{steps[size]} steps{batch_sizes_for(steps[size], rows, world, max(1, devices))}."
        )


def batch_sizes_for(steps: int, rows: int, world: int, devices: int) -> str:
    """The ``--batch-size`` values that make an epoch of ``rows`` rows ``steps`` steps on ``world`` ranks, each
    process's batch one per device of its ``devices``, as a refusal lists them: `` (--batch-size 479 to 718)``;
    empty when none does. They are one span: an epoch's steps only fall as the batch grows."""
    import math

    fits = [size for size in range(1, rows + 1) if math.ceil(math.ceil(rows / size) / world) == steps]
    if not fits:
        return ""
    low, high = math.ceil(fits[0] / devices), fits[-1] // devices
    if low > high:
        return ""
    if fits[-1] == rows:  # every batch of all the rows or more is one step too
        return f" (--batch-size {low} or more)"
    return f" (--batch-size {low})" if low == high else f" (--batch-size {low} to {high})"
