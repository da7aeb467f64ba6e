"""Several optimizers by name in a sharded (FSDP2) checkpoint: each saved under its name through DCP, restored into
sharded models by name, and rebuilt in one plain process.

A process group of one process (gloo, in this process) is enough to shard a model as torchrun jobs do.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import tracking
from tests.unit.gan import GAN, setup, train
from tests.unit.test_optimizers import assert_same, differs
from tracking.manifest import SHARDED_KIND

FULL = StateDictOptions(full_state_dict=True)


def sharded_setup(seed: int) -> tuple[GAN, dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """The GAN of tests.unit.gan, its generator, discriminator and whole sharded, with their optimizers by name."""

    def shard(model: GAN) -> None:
        fully_shard(model.generator)
        fully_shard(model.discriminator)
        fully_shard(model)

    return setup(seed, shard=shard)


def full(model: torch.nn.Module, optimizers: dict[str, Any], schedulers: dict[str, Any]) -> dict[str, Any]:
    """Full tensors of a sharded model and its optimizers (each keyed by parameter name), and the schedulers."""
    return {
        "model": get_model_state_dict(model, options=FULL),
        "optimizers": {name: get_optimizer_state_dict(model, one, options=FULL) for name, one in optimizers.items()},
        "schedulers": {name: one.state_dict() for name, one in schedulers.items()},
    }


def test_a_sharded_checkpoint_saves_and_restores_each_optimizer_by_name(
    s3_experiment: str, process_group: None
) -> None:
    model, optimizers, schedulers = sharded_setup(0)
    train(model, optimizers, schedulers, steps=3, seed=1)
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)
    assert logged.manifest.kind == SHARDED_KIND and logged.manifest.optimizers is not None
    saved = full(model, optimizers, schedulers)

    into, into_optimizers, into_schedulers = sharded_setup(5)
    train(into, into_optimizers, into_schedulers, steps=1, seed=2)
    assert differs(full(into, into_optimizers, into_schedulers), saved)
    tracking.restore(run.info.run_id, into, into_optimizers, into_schedulers)
    assert_same(full(into, into_optimizers, into_schedulers), saved)
    with pytest.raises(tracking.MismatchError, match=r"named \['generator'\]"):
        tracking.restore(run.info.run_id, into, {"generator": into_optimizers["generator"]})

    # Rebuilt in one plain process, each optimizer from its description, trains on as the sharded originals.
    loaded = tracking.load(run.info.run_id, mode="train")
    assert (loaded.optimizer, loaded.scheduler) == (None, None)
    train(loaded.model, loaded.optimizers, loaded.schedulers, steps=2, seed=3)
    train(model, optimizers, schedulers, steps=2, seed=3)
    after = full(model, optimizers, schedulers)
    assert_same(dict(loaded.model.state_dict()), after["model"])
    assert_same(loaded.schedulers["generator"].state_dict(), after["schedulers"]["generator"])
    for name, one in loaded.optimizers.items():
        by_name = get_optimizer_state_dict(loaded.model, one, options=FULL)
        assert_same(by_name["state"], after["optimizers"][name]["state"], name)


def test_a_whole_model_checkpoint_restores_named_optimizers_into_a_sharded_model(
    s3_experiment: str, process_group: None
) -> None:
    model, optimizers, schedulers = setup(0)  # plain: checkpoint.pt
    train(model, optimizers, schedulers, steps=3, seed=1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)

    into, into_optimizers, into_schedulers = sharded_setup(5)
    tracking.restore(run.info.run_id, into, into_optimizers, into_schedulers)
    restored = full(into, into_optimizers, into_schedulers)
    assert_same(restored["model"], dict(model.state_dict()))
    for name, one in optimizers.items():
        # The plain optimizer keyed by index, the sharded one by name: the same tensors in the same order.
        expected = [value for _, state in sorted(one.state_dict()["state"].items()) for value in state.values()]
        found = [value for state in restored["optimizers"][name]["state"].values() for value in state.values()]
        assert len(found) == len(expected) and all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))


class Generator(torch.nn.Module):
    """The GAN's generator alone: a model with no place for the discriminator's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))


def test_a_sharded_checkpoint_that_does_not_fit_what_restore_is_given_is_refused_and_loads_nothing(
    s3_experiment: str, process_group: None
) -> None:
    model, optimizers, schedulers = sharded_setup(0)
    train(model, optimizers, schedulers, steps=3, seed=1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizers, epoch=1, scheduler=schedulers)
        tracking.log_checkpoint(model, None, epoch=2)  # the weights alone
    run_id = run.info.run_id

    into, into_optimizers, into_schedulers = sharded_setup(5)
    before = full(into, into_optimizers, into_schedulers)
    swapped = {"generator": into_optimizers["discriminator"], "discriminator": into_optimizers["generator"]}
    half = Generator()
    fully_shard(half)
    half_before = get_model_state_dict(half, options=FULL)
    cases: list[tuple[torch.nn.Module, Any, str]] = [
        (into, swapped, "optim_state.discriminator.state.discriminator.0.bias.exp_avg"),  # a state of each, swapped
        (into, {**into_optimizers, "generator": torch.optim.Adam(into.parameters())}, "does not fit"),
        (half, None, "model_state.discriminator.0.bias"),  # left out without a word before: strict=True
    ]
    for target, optimizer, said in cases:
        # A MismatchError naming the run, not DCP's CheckpointException (no Exception: except Exception missed it).
        with pytest.raises(tracking.MismatchError) as refused:
            tracking.restore(run_id, target, optimizer, checkpoint=1)
        message = str(refused.value)
        assert message.startswith(f"run {run_id}: checkpoint-epoch-0001 (m-") and said in message, message
    assert_same(full(into, into_optimizers, into_schedulers), before)
    assert_same(get_model_state_dict(half, options=FULL), half_before)
    tracking.restore(run_id, half, checkpoint=1, strict=False)  # the weights that match, when asked for
    generator = {k: v for k, v in full(model, optimizers, schedulers)["model"].items() if k.startswith("generator.")}
    assert_same(get_model_state_dict(half, options=FULL), generator)

    # A checkpoint of the weights alone restores the model and leaves the optimizers as they are, as checkpoint.pt,
    # and says so.
    with pytest.warns(UserWarning, match=r"checkpoint-epoch-0002 .*holds no optimizer state"):
        tracking.restore(run_id, into, into_optimizers, checkpoint=2)
    restored = full(into, into_optimizers, into_schedulers)
    assert_same(restored["model"], full(model, optimizers, schedulers)["model"])
    assert_same(restored["optimizers"], before["optimizers"])
