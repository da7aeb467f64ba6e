"""The training loop under ``torchrun``: data-parallel (``--strategy ddp``) or sharded (``--strategy fsdp``).

torchrun --nproc-per-node 2 -m pipelines.digits --strategy fsdp --epochs 8
torchrun --nproc-per-node 2 -m pipelines.digits --strategy fsdp --resume RUN_ID --epochs 16

The same run, flags, checkpoints, resume and epoch loop (:func:`pipelines.epochs.run_epochs`) as the
single-process pipeline, with one process per rank on the gloo backend. Rank 0 alone talks to MLflow: it
finds the run to resume, starts the run, logs metrics and prints; every rank saves and restores
checkpoints (rank 0 writes a DDP model's, every rank its own shards of an FSDP2 one). Each rank draws its
batches from a ``DistributedSampler`` (seeded by ``--seed``, reshuffled by epoch) and keeps its own RNG
states in the checkpoint's ``rank_state``, so a resumed run reaches the same weights bit for bit on
every rank; a save in mid-epoch (``--checkpoint-every-steps``) also keeps the batches each rank had
taken of its share, which the resumed epoch skips.

Batch norm's running statistics are buffers every rank updates from its own batches: as DDP does,
rank 0's are broadcast before each training forward, under FSDP2 too.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import mlflow
import torch
import torch.distributed as dist
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

import tracking
from pipelines import data, options, override, reporting, resume, runs
from pipelines.epochs import AfterStep, run_epochs
from pipelines.steps import KEY, Position, SkippingBatches
from pipelines.task import State, Task, seed_everything
from tracking.parallel import distributed

STRATEGIES = ("ddp", "fsdp")
TAG_STRATEGY = "tracking.strategy"
TAG_WORLD_SIZE = "tracking.world_size"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the rendezvous variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def train(task: Task, opts: options.Options) -> str:
    """Train (or resume) one run with every rank of the torchrun job; returns the run ID on every rank."""
    if not launched():
        raise runs.PipelineError(
            f"--strategy {opts.strategy} trains with several processes: launch it with "
            f"`torchrun --nproc-per-node N -m {task.name} --strategy {opts.strategy} ...`."
        )
    with process_group():
        return _train(task, opts)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The torchrun job's process group (gloo) for the block, unless one exists already; torn down after it."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    try:
        yield
        dist.barrier()  # no rank tears the groups down while another still talks on them
    finally:
        if own_group:
            distributed.release()
            dist.destroy_process_group()


@contextlib.contextmanager
def lead_run(
    start: Callable[[], contextlib.AbstractContextManager[mlflow.ActiveRun]],
) -> Iterator[tuple[mlflow.ActiveRun | None, str]]:
    """Rank 0's MLflow run, entered by ``start()`` (None on the other ranks), and its ID on every rank.

    Rank 0 alone starts (or resumes) the run; its error is raised on every rank. Outside a process
    group, the one process's run.
    """
    with contextlib.ExitStack() as stack:
        entered: list[mlflow.ActiveRun] = []

        def open_run() -> str:
            entered.append(stack.enter_context(start()))
            return str(entered[0].info.run_id)

        run_id = distributed.on_rank0(open_run)
        yield (entered[0] if entered else None), run_id


def _train(task: Task, opts: options.Options) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    opts = distributed.on_rank0(lambda: resume.pinned(opts, config))

    def settle() -> tuple[options.Options, Run | None, dict[str, Any], dict[str, tuple[str, str]]]:
        origin = resume.find_origin(client, task, opts, config) if opts.resume else None
        values = opts.settings(override.current_params(origin), origin.info.run_id if origin else None)
        overrides = runs.changed_params(task, opts, origin) if origin else {}
        return resume.with_target(opts, origin), origin, values, overrides

    opts, origin, values, overrides = distributed.on_rank0(settle)
    split = data.load(task.dataset)
    seed_everything(values["seed"])
    state = _build(task, opts, values, split)
    rank_state = None
    if origin is not None:
        rank_state = _restore(task, opts, origin, state, values)
    position = None
    if origin is not None and rank_state is not None:
        # Each rank skips its own share's samples: in batches of the size it trains with now, or refused.
        position = resume.resumed_position(
            Position.read(rank_state.get(KEY)), values, overrides, origin.info.run_id, (state.epoch, state.step)
        )
    dataset = TensorDataset(split.x_train, split.y_train)
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=values["seed"]
    )
    # What DataLoader(batch_size=, sampler=sampler) builds, able to begin an epoch past the batches a save in
    # mid-epoch had taken (this rank's: each rank skips its own share).
    batches = SkippingBatches(BatchSampler(sampler, values["batch_size"], False))
    loader = DataLoader(dataset, batch_sampler=batches)
    checkpoints = runs.checkpointer(
        values,
        f"torchrun --nproc-per-node {world} -m {task.name} --strategy {opts.strategy} "
        f"--resume {{run_id}} --epochs {2 * opts.epochs}",
    )
    plain = State(_plain(state.model), state.optimizer, state.scheduler, state.epoch, state.step)
    with (
        lead_run(lambda: runs.start(client, config, task, opts, origin, values, overrides, plain)) as (run, run_id),
        checkpoints,
    ):
        if run is not None:
            reporting.announce(client, run)
            mlflow.set_tags({TAG_STRATEGY: str(opts.strategy), TAG_WORLD_SIZE: str(world)})
        restore = None
        if rank_state is not None and "seed" not in overrides:
            saved_rng = rank_state["rng"]
            restore = functools.partial(tracking.restore_rng_state, saved_rng)
        if restore is not None and position is None:
            # Last thing before the loop, as in the single-process pipeline (and, as there, not with a new seed).
            restore()
            restore = None

        def train_epoch(epoch: int, start: Position | None, after_step: AfterStep) -> tuple[float, float]:
            # A save in mid-epoch took the RNG states after its epoch's loader drew its seed from them: they
            # are put back once the resumed epoch's loader drew its own.
            batches.skip = start.batches if start else 0
            return _train_epoch(task, state, sampler, loader, epoch, start, after_step, restore if start else None)

        def carried(epoch: int, position: Position | None) -> dict[str, Any]:
            saved = {
                "rng": tracking.capture_rng_state(),
                "sampler": {"seed": values["seed"], "epoch": epoch, "world_size": world},
            }
            return {"rank_state": saved if position is None else {**saved, KEY: position.saved(values["batch_size"])}}

        run_epochs(
            task,
            state,
            opts.epochs,
            checkpoints,
            train_epoch,
            (split.x_val, split.y_val),
            carried,
            lead=run is not None,
            resumed=position,
        )
        whole = _plain_copy(task, state.model, split.n_features)
        if run is not None:
            assert whole is not None
            by_step = checkpoints.every_n_steps is not None  # charted by global step
            logged = runs.log_final_weights(whole, opts.epochs, state.step if by_step else None)
            reporting.report(client, run, logged.model_id)
        return run_id


def _build(task: Task, opts: options.Options, values: dict[str, Any], split: data.Split) -> State:
    model = task.build_model(split.n_features)
    if opts.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        model.register_forward_pre_hook(_broadcast_buffers)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = task.build_optimizer(model.parameters(), values["lr"])
    scheduler = task.build_scheduler(optimizer) if task.build_scheduler else None
    return State(model, optimizer, scheduler)


def _broadcast_buffers(module: nn.Module, args: Any) -> None:
    # What DDP does before each training forward: every rank starts from rank 0's running statistics.
    if module.training:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _restore(
    task: Task,
    opts: options.Options,
    origin: Run,
    state: State,
    values: dict[str, Any],
) -> dict[str, Any]:
    run_id = origin.info.run_id
    loaded = tracking.restore(
        run_id,
        state.model,
        state.optimizer,
        state.scheduler,
        checkpoint=resume.picked(opts),
    )
    epoch = loaded.epoch or 0
    resume.check_target(origin, epoch, opts)
    saved = loaded.rank_state
    if not isinstance(saved, dict) or "rng" not in saved:
        raise runs.PipelineError(
            f"run {run_id}: {loaded.path} holds no RNG state for rank {dist.get_rank()}, so it cannot be resumed "
            f"exactly by {dist.get_world_size()} ranks; resume it with the number of ranks that saved it."
        )
    if saved.get("sampler", {}).get("world_size", dist.get_world_size()) != dist.get_world_size():
        raise runs.PipelineError(
            f"run {run_id} was trained by {saved['sampler']['world_size']} ranks; resume it with as many "
            "(torchrun --nproc-per-node), or the batches would differ."
        )
    resume.apply_lr(state.optimizer, state.scheduler, values["lr"])
    state.epoch, state.step = epoch, loaded.step or 0
    return saved


def _train_epoch(
    task: Task,
    state: State,
    sampler: DistributedSampler[Any],
    loader: DataLoader[Any],
    epoch: int,
    start: Position | None,
    after_step: AfterStep,
    restore: Callable[[], None] | None,
) -> tuple[float, float]:
    sampler.set_epoch(epoch)  # each epoch's own shuffle, the same on every rank
    state.model.train()
    # Loss sum, correct, seen: this rank's, or those the save in mid-epoch had summed.
    totals = start.sums["totals"].clone() if start else torch.zeros(3, dtype=torch.float64)
    taken, last = (start.batches if start else 0), len(loader)

    def so_far() -> tuple[float, float]:
        summed = totals.clone()
        dist.all_reduce(summed)  # over every rank's batches
        return float(summed[0] / summed[2]), float(summed[1] / summed[2])

    batches = iter(loader)
    if restore is not None:
        restore()
    for x, y in batches:
        state.optimizer.zero_grad()
        outputs = state.model(x)
        loss = task.loss(outputs, y)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        taken += 1
        totals += torch.tensor([loss.item() * len(y), (task.predict(outputs) == y).sum().item(), len(y)])
        after_step(Position(taken, {"totals": totals}), so_far, taken == last)
    if state.scheduler is not None:
        state.scheduler.step()
    return so_far()


def _plain(model: nn.Module) -> nn.Module:
    return distributed.unwrap(model)


def _plain_copy(task: Task, model: nn.Module, n_features: int) -> nn.Module | None:
    """On rank 0, an ordinary model holding the trained weights (an FSDP2 model's gathered); None elsewhere."""
    if distributed.is_sharded(model.state_dict()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        whole = task.build_model(n_features)
        whole.load_state_dict(full)
        return whole
    return distributed.unwrap(model) if dist.get_rank() == 0 else None
