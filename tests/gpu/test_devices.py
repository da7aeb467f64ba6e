"""Checkpoints on a real CUDA device: map_location both ways, exact AMP continuation, async
snapshots, CUDA RNG states with more or fewer GPUs than saved, and both pipelines resuming on
the GPU bit for bit."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines import digits, train
from pipelines.models import DigitsMLP
from tests.unit.test_pipelines import assert_identical, checkpoint, env, inline

pytestmark = pytest.mark.gpu
__all__ = ["env"]

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adam-capturable": lambda params: torch.optim.Adam(params, lr=1e-2, capturable=True),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def batch(seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 64, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)


def amp_steps(model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, device: str, seeds: range) -> None:
    model.train()
    for seed in seeds:
        x, y = batch(seed, device)
        optimizer.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def setup(device: str, optimizer: str) -> tuple[DigitsMLP, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = DigitsMLP(hidden=32, dropout=0.0).to(device)
    optim = OPTIMIZERS[optimizer](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, scheduler, torch.amp.GradScaler(device)


def on(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: on(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [on(v, device) for v in value]
    return value


# Fused and capturable Adam keep their state on the GPU: they move between GPUs, not to the CPU.
ROUND_TRIPS = [
    (saved, loaded, optimizer)
    for saved, loaded in [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")]
    for optimizer in sorted(OPTIMIZERS)
    if (saved, loaded) == ("cuda", "cuda") or optimizer in ("adam-foreach", "sgd-momentum")
]


@pytest.mark.parametrize(("saved_on", "loaded_on", "optimizer"), ROUND_TRIPS)
def test_round_trip_between_devices(s3_experiment: str, saved_on: str, loaded_on: str, optimizer: str) -> None:
    model, optim, scheduler, scaler = setup(saved_on, optimizer)
    amp_steps(model, optim, scheduler, scaler, saved_on, range(3))
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optim, epoch=3, scheduler=scheduler, scaler=scaler)
    loaded = tracking.load(run.info.run_id, map_location=loaded_on, mode="train")
    assert {p.device.type for p in loaded.model.parameters()} == {loaded_on}
    assert loaded.optimizer is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name].cpu(), tensor.cpu()), name
    assert_identical(on(loaded.optimizer.state_dict(), "cpu"), on(optim.state_dict(), "cpu"), "optimizer")
    for state in loaded.optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert value.device.type == loaded_on, key
    assert loaded.scaler.state_dict() == scaler.state_dict()
    if saved_on == loaded_on:
        # Three more AMP steps from the loaded objects are three more steps of the originals, bit for bit.
        amp_steps(model, optim, scheduler, scaler, saved_on, range(3, 6))
        amp_steps(loaded.model, loaded.optimizer, loaded.scheduler, loaded.scaler, loaded_on, range(3, 6))
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("loaded_on", ["cuda", "cpu"])
def test_bf16_weights_come_back_bf16(s3_experiment: str, loaded_on: str) -> None:
    model = DigitsMLP(hidden=32, dropout=0.0).to("cuda", torch.bfloat16)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, torch.optim.AdamW(model.parameters(), lr=1e-3), epoch=1)
    loaded = tracking.load(run.info.run_id, map_location=loaded_on)
    for name, tensor in model.state_dict().items():
        got = loaded.model.state_dict()[name]
        assert got.dtype == tensor.dtype and got.device.type == loaded_on, name
        assert torch.equal(got.cpu(), tensor.cpu()), name


def test_restore_into_cuda_objects(s3_experiment: str) -> None:
    model, optim, scheduler, scaler = setup("cuda", "adam-foreach")
    amp_steps(model, optim, scheduler, scaler, "cuda", range(3))
    generator = torch.Generator().manual_seed(1)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(
            model, optim, epoch=3, scheduler=scheduler, scaler=scaler,
            extra={"rng": tracking.capture_rng_state({"sampler": generator})},
        )  # fmt: skip
    fresh, fresh_optim, fresh_scheduler, fresh_scaler = setup("cuda", "adam-foreach")
    result = tracking.restore(run.info.run_id, fresh, fresh_optim, fresh_scheduler, fresh_scaler)
    assert result.extra["rng"]["torch"].device.type == "cpu"
    tracking.restore_rng_state(result.extra["rng"], {"sampler": generator})
    amp_steps(model, optim, scheduler, scaler, "cuda", range(3, 6))
    amp_steps(fresh, fresh_optim, fresh_scheduler, fresh_scaler, "cuda", range(3, 6))
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_async_save_is_a_snapshot(s3_experiment: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024).cuda()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optim, epoch=1, blocking=False)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)  # right after the call: must not leak into the checkpoint
        tracking.wait_for_checkpoints()
    loaded = tracking.load_state_dict(run.info.run_id, checkpoint="latest")
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_pinned_memory_is_reserved_between_saves(s3_experiment: str) -> None:
    """A Checkpointer saving asynchronously reserves the pinned memory of its next snapshot on a
    call that saves nothing; the snapshot that follows is still exact."""
    import threading

    from tracking.saver import reserve_host_memory

    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512).cuda()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(8, 512, device="cuda"), torch.randn(8, 512, device="cuda")) for _ in range(2)]
    for x, y in batches:
        optim.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optim.step()
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights + momentum
    assert reserve_host_memory((model.state_dict(), optim.state_dict())) == state_bytes
    with mlflow.start_run() as run, tracking.Checkpointer(every_n_epochs=2, async_save=True) as checkpoints:
        assert checkpoints.save(model, optim, epoch=1) is None
        for thread in threading.enumerate():
            if thread.name == "tracking-pinned-reserve":
                thread.join(timeout=60)
        expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
        checkpoints.save(model, optim, epoch=2)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(0.0)
    loaded = tracking.load_state_dict(run.info.run_id, checkpoint="latest")
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("extra_gpus", [0, 1, -1], ids=["same", "more-than-here", "fewer-than-here"])
def test_cuda_rng_restores_with_another_gpu_count(extra_gpus: int) -> None:
    here = torch.cuda.device_count()
    torch.cuda.manual_seed_all(11)
    state = tracking.capture_rng_state()
    expected = torch.rand(4, device="cuda").cpu()
    # A job with another number of GPUs: device 0's state, as many times as that job had GPUs.
    saved = here + extra_gpus
    state["cuda"] = [state["cuda"][0]] * saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracking.restore_rng_state(on(state, "cuda"))
    assert [str(w.message) for w in caught if "CUDA RNG" in str(w.message)] == (
        [] if extra_gpus == 0 else [f"the checkpoint holds the CUDA RNG states of {saved} GPU(s) and {here} "
                                    f"are visible here: restoring {min(saved, here)}; a resumed run draws "
                                    "other numbers on the rest."]
    )  # fmt: skip
    if saved:
        assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)


@pytest.mark.parametrize("pipeline", [train, digits], ids=["train", "digits"])
def test_pipeline_resumes_on_cuda_bit_for_bit(env: dict[str, str], pipeline: Any) -> None:
    straight = inline(pipeline.main, "--epochs", "6", "--checkpoint-every", "1")
    assert straight.code == 0, straight.err
    first = inline(pipeline.main, "--epochs", "3", "--checkpoint-every", "1")
    assert first.code == 0, first.err
    resumed = inline(pipeline.main, "--resume", first.run_id, "--epochs", "6")
    assert resumed.code == 0, resumed.err
    client = MlflowClient()
    assert client.get_run(first.run_id).data.params == client.get_run(straight.run_id).data.params
    assert_identical(checkpoint(first.run_id, 6), checkpoint(straight.run_id, 6))
