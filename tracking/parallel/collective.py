"""The commit as a collective: under ``torchrun`` every rank calls it, and every rank gets its result.

Outside a process group it is :func:`tracking.commit.commit_checkpoint`. Inside one, rank 0
alone talks to MLflow; a sharded checkpoint is written by every rank (:mod:`tracking.parallel.sharded`),
any other by rank 0 with every rank's own state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tracking import layout
from tracking.catalog import LoggedCheckpoint
from tracking.commit import CheckpointSnapshot, Describe, commit_checkpoint
from tracking.config import TrackingConfig
from tracking.manifest import SHARDED_KIND
from tracking.parallel import distributed
from tracking.run import RunHandle


def commit(
    handle: RunHandle | None,
    snapshot: CheckpointSnapshot,
    describe: Describe | None = None,
    after: Callable[[LoggedCheckpoint], object] | None = None,
    config: TrackingConfig | None = None,
    refused: Exception | None = None,
) -> LoggedCheckpoint:
    """Commit ``snapshot`` from every rank of a process group (or from the one process there is).

    Rank 0, the only one with the run's ``handle``, talks to MLflow. A sharded snapshot is
    written by every rank (:mod:`tracking.parallel.sharded`), each to the store its ``config`` says (the one
    the caller gave; else the environment's); any other is written by rank 0 alone,
    with every rank's ``rank_state``. ``after`` runs on rank 0 once the checkpoint is
    committed (retention). Every rank returns the checkpoint, or raises the same error: ``refused``, rank 0's
    error before the commit (opening the run, see :func:`distributed.lead`), at the commit's first step.
    """
    key = (snapshot.manifest.epoch, snapshot.manifest.step)
    arrival = f"the save of {keys_named(*key)}"  # what a rank waiting for the others there names
    if snapshot.manifest.kind == SHARDED_KIND:
        # Imported here: torch.distributed.checkpoint costs every other save nothing.
        from tracking.parallel.sharded import commit_sharded

        # Before rank 0 creates its logged model: two small collectives beside the shards' writes.
        keys = distributed.gather(key, arrival=arrival)

        def refuse() -> None:
            if refused is not None:
                raise refused
            refuse_different_keys(handle, keys)

        distributed.on_rank0(refuse)
        return commit_sharded(handle, snapshot, describe, after, config)
    # Every rank's key travels with its rank_state, in the one gather the commit makes anyway.
    gathered = distributed.gather((snapshot.rank_state, key), arrival=arrival) if distributed.active() else None

    def on_rank0() -> LoggedCheckpoint:
        if refused is not None:
            raise refused
        assert handle is not None
        if gathered is not None:
            refuse_different_keys(handle, [rank_key for _, rank_key in gathered])
            states = [state for state, _ in gathered]
            if any(state is not None for state in states):
                snapshot.payload[layout.RANK_STATE] = states
        logged = commit_checkpoint(handle, snapshot, describe)
        if after is not None:
            after(logged)
        return logged

    return distributed.on_rank0(on_rank0)


def keys_named(epoch: int | None, step: int | None) -> str:
    """How a rank waiting for the others names the key it was given: ``epoch 7, step 1500``, ``epoch 7``."""
    return ", ".join(f"{name} {value}" for name, value in (("epoch", epoch), ("step", step)) if value is not None)


def refuse_different_keys(
    handle: RunHandle | None,
    keys: Sequence[tuple[int | None, int | None]] | None,
    *,
    called: str = "saved one checkpoint (tracking.log_checkpoint, Checkpointer.save)",
    outcome: str = "only rank 0's would be stored",
) -> None:
    """On rank 0, raise when the ranks gave one collective call different ``(epoch, step)`` (``keys``, in rank order).

    ``called`` says what the ranks called, ``outcome`` what the different keys would do: by default a collective
    save, which would store rank 0's alone, under a key the other ranks did not mean.
    """
    if not keys or all(key == keys[0] for key in keys):
        return
    assert handle is not None
    other = next(rank for rank, key in enumerate(keys) if key != keys[0])
    (epoch, step), (other_epoch, other_step) = keys[0], keys[other]
    raise ValueError(
        f"run {handle.run_id}: the ranks {called} with different keys (rank 0: epoch={epoch}, step={step}; "
        f"rank {other}: epoch={other_epoch}, step={other_step}), and {outcome}. Nothing was stored. Pass every rank "
        "the same epoch= and step= (the training loop's counters, not a count of each rank's own)."
    )
