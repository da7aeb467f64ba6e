"""Process-group awareness for saves and loads under ``torchrun``.

Outside an initialised process group of more than one process, everything here is a no-op
and a save or load is the single-process one. Inside one, only rank 0 talks to MLflow: it
does a step alone and hands the result, or the error, to every rank, so that all ranks
return the same checkpoint or raise the same error.

Checkpoint coordination uses a gloo group of its own, made once by all ranks (in the order
they first save or load), so a background save can exchange messages while the training
loop runs collectives on the default group.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from torch import nn

from tracking.errors import TrackingError
from tracking.rank import warn_on_rank_zero

T = TypeVar("T")
P = ParamSpec("P")

_log = logging.getLogger(__name__)

# How long a rank waits in the coordination group for rank 0's step. A synchronous save holds the
# other ranks for as long as its upload takes (hours for a checkpoint of hundreds of GB), longer than
# torch's default of 30 minutes. A dead or silent endpoint still ends the step in about 30 s (the
# library's own request bounds), and torchrun ends the job when a rank dies.
COORDINATION_TIMEOUT = timedelta(hours=24)

# How long a rank waits in the first collective of a save or load for the other ranks before it says why they may
# never come: the ranks of a training loop reach a save within a step of each other. A save called under
# `if rank == 0:` (PyTorch's habit for torch.save), or one due on some ranks only (ranks whose epoch or step
# counters drifted apart), leaves the ranks that called it waiting here while the others wait for them in the next
# collective of the training loop, silent until one of the groups times out.
ARRIVAL_WARNING_S = 60.0


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def initialised() -> bool:
    """Whether a process group is initialised (of any size, one included)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if initialised() else 0


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn`` on rank 0 alone: what every rank of a job reaches alike (every rank loads the same
    checkpoint) is said once, not once per rank. ``stacklevel`` counts from the caller, as ``warnings.warn``'s does."""
    # rank() is the process group's, 0 on every rank before one is made: warn_on_rank_zero asks torchrun's RANK then.
    if rank() == 0:
        warn_on_rank_zero(message, category, stacklevel=stacklevel + 1)


def local_rank() -> int:
    """This process's rank on its machine: ``LOCAL_RANK``, as torchrun and accelerate set it; else :func:`rank`."""
    value = os.environ.get("LOCAL_RANK", "")
    return int(value) if value.isdigit() else rank()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if initialised() else 1


def group() -> Any:
    """The gloo group checkpoint coordination runs on (made on first use, by every rank)."""
    import torch.distributed as dist

    world = id(_default_group())
    if world not in _groups:
        _groups[world] = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
        if len(_groups) == 1:
            # Destroyed at exit, before the default group (atexit runs the last registered first, and
            # Lightning registers its destroy_process_group when it starts the group): a gloo group left
            # to the interpreter's teardown can abort a rank once its peer is gone ("terminate called
            # without an active exception"), failing a torchrun job that finished.
            atexit.register(release)
    return _groups[world]


def prepare() -> None:
    """Before a background save: make the coordination group now, on the calling thread, and have
    ``torch.distributed.destroy_process_group()`` wait for background saves first."""
    if active():
        group()
        _flush_before_destroy()


def in_background(job: Callable[[], T], what: str) -> Callable[[], T]:
    """``job``, a save to run in the background, failing with an error that says what to do when the process
    group it needs is destroyed under it (by a ``destroy_process_group`` that does not wait for it)."""
    if not active():
        return job

    def run() -> T:
        try:
            return job()
        except Exception as exc:
            if initialised():
                raise
            raise TrackingError(
                f"{what} was still saving in the background when the process group was destroyed, so this "
                "rank could not finish it (a checkpoint is loaded only once every rank stored its part); call "
                "tracking.wait_for_checkpoints() (or the Checkpointer's close()) before destroy_process_group()."
            ) from exc

    return run


def _flush_before_destroy() -> None:
    """Wrap ``torch.distributed.destroy_process_group`` (once) so that destroying the job's process group
    first waits for every background save, then raises a failed one's error.

    A torchrun script ends with it, as PyTorch's examples do, often right after its last save: destroyed
    under a commit still in flight, the groups would take that checkpoint with them, and the job would
    fail with gloo's "Connection closed by peer" or "Default process group has not been initialized".
    """
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    if getattr(destroy, "flushes_checkpoints", False):
        return

    @functools.wraps(destroy)
    def destroy_process_group(group: Any = None) -> None:
        if group is not None and group is not dist.group.WORLD:
            destroy(group)
            return
        from tracking.saver import wait_for_checkpoints

        try:
            wait_for_checkpoints()
        finally:
            release()
            destroy(group)

    destroy_process_group.flushes_checkpoints = True  # type: ignore[attr-defined]
    dist.destroy_process_group = destroy_process_group


def release() -> None:
    """Destroy the coordination group (before ``destroy_process_group``): a later process group gets a new one."""
    import torch.distributed as dist

    if initialised():
        for made in _groups.values():
            try:
                dist.destroy_process_group(made)
            except (ValueError, RuntimeError):
                pass  # made for a process group destroyed since, and destroyed with it
    if _groups:
        atexit.unregister(release)
    _groups.clear()


def _default_group() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD


# The coordination group of each default group (by its id): a test that destroys and re-creates the
# process group gets a new one.
_groups: dict[int, Any] = {}


def on_rank0(step: Callable[[], T], *, arrival: str | None = None) -> T:
    """Run ``step`` on rank 0 only and return its result on every rank; raise its error on every rank.

    ``arrival``: what every rank calls, when this is its first collective (see :func:`_arrival_watch`); the
    ranks then meet before rank 0 runs ``step``, so that a rank's wait there is for the others to arrive, not
    for rank 0's step. Outside a process group, ``step()``.
    """
    if not active():
        return step()
    import torch.distributed as dist

    if arrival is not None:
        with _arrival_watch(arrival):
            dist.barrier(group=group())
    outcome: list[Any] = [None]
    if rank() == 0:
        try:
            outcome[0] = ("ok", step())
        except BaseException as exc:
            outcome[0] = ("error", portable(exc))
    dist.broadcast_object_list(outcome, src=0, group=group())
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def lead(step: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """``step()`` on rank 0 alone: what it returned (None on the other ranks), and the error it raised, for the
    collective that follows to raise on every rank (raised here, on rank 0 alone, it would leave the other ranks
    waiting in that collective for good). Outside a process group, ``step()``'s result, or its error raised."""
    if rank() != 0:
        return None, None
    if not active():
        return step(), None
    try:
        return step(), None
    except Exception as exc:
        return None, exc


def raise_together(error: BaseException | None) -> None:
    """Raise on every rank when any rank has an ``error`` (the lowest rank's), else return."""
    if not active():
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    errors: list[Any] = [None] * world_size()
    dist.all_gather_object(errors, None if error is None else portable(error), group=group())
    for found_rank, found in enumerate(errors):
        if found is not None:
            if found_rank == rank() and error is not None:
                raise error  # this rank's own, with its traceback
            raise found


def together(function: Callable[P, T]) -> Callable[P, T]:
    """``function``, which every rank calls, returning on every rank or raising on every rank (the lowest failing
    rank's error): a step each rank does alone (reading its own shards) may fail on some ranks only, and a rank
    that returned would go on into the training loop's collectives, which the ranks that raised never reach."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            result = function(*args, **kwargs)
        except Exception as exc:
            raise_together(exc)
            raise
        raise_together(None)
        return result

    return call


def gather(value: T, *, arrival: str | None = None) -> list[T] | None:
    """Every rank's ``value`` in rank order, on rank 0; None on the other ranks. ``[value]`` outside a group.

    ``arrival``: what every rank calls, when this is its first collective (see :func:`_arrival_watch`).
    """
    if not active():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    with _arrival_watch(arrival):
        dist.gather_object(value, gathered, dst=0, group=group())
    return gathered


def every(value: T) -> list[T]:
    """Every rank's ``value`` in rank order, on every rank: what all ranks must decide alike. ``[value]`` outside a
    group."""
    if not active():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value, group=group())
    return gathered


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier(group=group())


@contextmanager
def _arrival_watch(arrival: str | None) -> Iterator[None]:
    """Around the first collective of a save or load (``arrival`` names it: ``the save of epoch 7, step 1500``),
    once this process's background saves committed (see :func:`tracking.saver.settle_before_collective`),
    which every rank reaches within a step of the others: on whichever rank waits there ``ARRIVAL_WARNING_S``
    without the others, say once why they may never come, and go on waiting (a rank that is only slower still
    arrives). Not around later ones: there a rank may wait as long as another rank's upload or download takes."""
    if arrival is None:
        yield
        return
    from tracking.saver import settle_before_collective

    settle_before_collective()
    watch = threading.Timer(ARRIVAL_WARNING_S, _warn_waiting, args=(rank(), world_size(), arrival))
    watch.daemon = True
    watch.start()
    try:
        yield
    finally:
        watch.cancel()


def _warn_waiting(waiting: int, ranks: int, arrival: str) -> None:
    _log.warning(
        "rank %d has waited %.0f s for the other %d rank(s) to reach %s: under torchrun every rank calls "
        "tracking.log_checkpoint, Checkpointer.save and tracking.restore (rank 0 alone talks to MLflow), with the "
        "same epoch= and step=. Likely causes: the call is made on some ranks only (e.g. under `if rank == 0:`), or "
        "the ranks' epoch or step counters differ, so that a save is due on some ranks only (e.g. "
        "Checkpointer(every_n_steps=...) given each rank's own count of steps, which drifts when a rank skips a "
        "batch). Make the call on every rank, with the training loop's shared counters: else the job hangs until "
        "its collectives time out. Still waiting, in case another rank is only slower.",
        waiting,
        ARRIVAL_WARNING_S,
        ranks - 1,
        arrival,
    )


def portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it survives pickling (it is sent to the other ranks), else a TrackingError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return TrackingError(f"{type(exc).__name__}: {exc}")
    return exc


def unwrap(model: nn.Module) -> nn.Module:
    """The module wrappers hold, however nested: ``DistributedDataParallel``, ``DataParallel``, ``torch.compile``'s.

    Its state dict has no ``module.`` or ``_orig_mod.`` prefix, so that a model of its class, wrapped or
    not, loads what is saved from it.
    """
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel | DataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]  # nn.Module's __getattr__ types it loosely
        else:
            return model


def _loaded_class(module: str, name: str) -> type | None:
    """``module``'s class ``name`` once imported, else None (nothing is of it before): importing it to look would
    cost every process that never compiles or shards (torch.distributed's: 0.6 s of CPU at the first save)."""
    return getattr(sys.modules.get(module), name, None)


def _is_compiled(model: nn.Module) -> bool:
    return isinstance(model, _loaded_class("torch._dynamo.eval_frame", "OptimizedModule") or ())


def is_sharded(value: Any) -> bool:
    """Whether ``value`` (a tensor or a state dict) holds a DTensor: FSDP2 or tensor-parallel state."""
    DTensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if DTensor is None:
        return False
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, DTensor):
            return True
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


def model_class(model: nn.Module) -> type:
    """The user's class of ``model``: ``fully_shard`` swaps in a subclass it generates."""
    FSDPModule = _loaded_class("torch.distributed.fsdp", "FSDPModule")  # fully_shard lives in that module
    if FSDPModule is not None and isinstance(model, FSDPModule):
        return next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    return type(model)
