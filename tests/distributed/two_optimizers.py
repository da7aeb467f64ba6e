"""A user's torchrun script training a GAN with two optimizers and their schedulers, by name: every rank logs one
checkpoint of both, restores it into fresh objects by name and checks them against its own; rank 0 saves the full
states it logged where the test can read them.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.two_optimizers ddp|fsdp OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import tracking
from tests.distributed import tiny_job
from tests.unit.gan import GAN, train

FULL = StateDictOptions(full_state_dict=True)  # gathered on every rank


def build(strategy: str, seed: int) -> tuple[nn.Module, GAN, dict[str, Any], dict[str, Any]]:
    """The model as the strategy wraps it, the GAN inside, and its optimizers and schedulers by name."""
    torch.manual_seed(seed)
    gan = GAN()
    model: nn.Module = gan
    if strategy == "fsdp":
        fully_shard(gan.generator)
        fully_shard(gan.discriminator)
        fully_shard(gan)
    else:
        model = nn.parallel.DistributedDataParallel(gan)
    optimizers = {
        "generator": torch.optim.Adam(gan.generator.parameters(), lr=1e-2, betas=(0.5, 0.999)),
        "discriminator": torch.optim.Adam(gan.discriminator.parameters(), lr=3e-3),
    }
    schedulers = {
        "generator": torch.optim.lr_scheduler.StepLR(optimizers["generator"], step_size=2, gamma=0.5),
        "discriminator": torch.optim.lr_scheduler.ExponentialLR(optimizers["discriminator"], gamma=0.9),
    }
    return model, gan, optimizers, schedulers


def full(gan: GAN, optimizers: dict[str, Any], schedulers: dict[str, Any]) -> dict[str, Any]:
    """Whole tensors (a sharded model's gathered), each optimizer's state keyed by parameter name."""
    return {
        "model_state": get_model_state_dict(gan, options=FULL),
        "optim_state": {name: get_optimizer_state_dict(gan, one, options=FULL) for name, one in optimizers.items()},
        "scheduler_state": {name: one.state_dict() for name, one in schedulers.items()},
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def main(strategy: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_id = [mlflow.start_run().info.run_id if rank == 0 else None]
    if rank == 0:
        tiny_job.say(f"MLflow run {run_id[0]}")
    dist.broadcast_object_list(run_id, src=0)  # every rank restores from the run rank 0 logs to
    model, gan, optimizers, schedulers = build(strategy, seed=0)
    # The same batches on every rank: the replicas of a DDP model stay equal without its forward's gradient sync.
    train(gan, optimizers, schedulers, steps=3, seed=1)
    tracking.log_checkpoint(model, optimizers, epoch=3, scheduler=schedulers)
    saved = full(gan, optimizers, schedulers)
    if rank == 0:
        torch.save(saved, out / "saved.pt")

    fresh, fresh_gan, fresh_optimizers, fresh_schedulers = build(strategy, seed=5)
    before = same(full(fresh_gan, fresh_optimizers, fresh_schedulers), saved)
    tracking.restore(str(run_id[0]), fresh, fresh_optimizers, fresh_schedulers)
    after = same(full(fresh_gan, fresh_optimizers, fresh_schedulers), saved)
    tiny_job.say(f"rank {rank} restored {sorted(fresh_optimizers)}: equal before {before}, after {after}")
    tiny_job.finish(rank)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
