"""The commit as a collective: under ``torchrun`` every rank calls it, and every rank gets its result.

Outside a process group it is :func:`tracking.commit.commit_checkpoint`. Inside one, rank 0
alone talks to MLflow; a sharded checkpoint is written by every rank (:mod:`tracking.parallel.sharded`),
any other by rank 0 with every rank's own state.
"""

from __future__ import annotations

from collections.abc import Callable

from tracking import layout
from tracking.catalog import LoggedCheckpoint
from tracking.commit import CheckpointSnapshot, Describe, commit_checkpoint
from tracking.manifest import SHARDED_KIND
from tracking.parallel import distributed
from tracking.run import RunHandle


def commit(
    handle: RunHandle | None,
    snapshot: CheckpointSnapshot,
    describe: Describe | None = None,
    after: Callable[[LoggedCheckpoint], object] | None = None,
) -> LoggedCheckpoint:
    """Commit ``snapshot`` from every rank of a process group (or from the one process there is).

    Rank 0, the only one with the run's ``handle``, talks to MLflow. A sharded snapshot is
    written by every rank (:mod:`tracking.parallel.sharded`); any other is written by rank 0 alone,
    with every rank's ``rank_state``. ``after`` runs on rank 0 once the checkpoint is
    committed (retention). Every rank returns the checkpoint, or raises the same error.
    """
    if snapshot.manifest.kind == SHARDED_KIND:
        # Imported here: torch.distributed.checkpoint costs every other save nothing.
        from tracking.parallel.sharded import commit_sharded

        return commit_sharded(handle, snapshot, describe, after)
    states = distributed.gather(snapshot.rank_state) if distributed.active() else None

    def on_rank0() -> LoggedCheckpoint:
        assert handle is not None
        if states is not None and any(state is not None for state in states):
            snapshot.payload[layout.RANK_STATE] = states
        logged = commit_checkpoint(handle, snapshot, describe)
        if after is not None:
            after(logged)
        return logged

    return distributed.on_rank0(on_rank0)
