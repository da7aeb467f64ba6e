"""Device rules on a CPU-only machine: only weights, optimizer state and the scaler follow map_location.

RNG states, rank_state and counters are restored from host copies whatever device a checkpoint's
tensors were mapped to, and CUDA RNG states go to the GPUs that exist. The same rules on a real
GPU are the ``gpu`` tier's (tests/gpu).
"""

from __future__ import annotations

import random
from typing import Any

import mlflow
import numpy as np
import pytest
import torch

import tracking
from pipelines.models import DigitsMLP


class OnAccelerator(torch.Tensor):
    """A tensor that, as a CUDA one does, refuses numpy until it is copied to the host."""

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy it first.")

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


def on_accelerator(value: Any) -> Any:
    """``value`` with every tensor as one that lives on an accelerator (as ``map_location="cuda"`` maps it)."""
    if isinstance(value, torch.Tensor):
        return value.clone().as_subclass(OnAccelerator)
    if isinstance(value, dict):
        return {k: on_accelerator(v) for k, v in value.items()}
    if isinstance(value, list):
        return [on_accelerator(v) for v in value]
    return value


def draws(generator: torch.Generator) -> tuple[Any, ...]:
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        random.random(),
        torch.rand(3, generator=generator).tolist(),
    )


def test_rng_state_restores_from_tensors_on_another_device() -> None:
    generator = torch.Generator().manual_seed(7)
    saved = tracking.capture_rng_state({"sampler": generator})
    expected = draws(generator)
    tracking.restore_rng_state(on_accelerator(saved), {"sampler": generator})
    assert draws(generator) == expected


def test_a_generator_the_state_does_not_hold_is_refused_before_anything_is_restored() -> None:
    # A bare KeyError, raised after the global states were already put back: half a restore, and no next step.
    saved = tracking.capture_rng_state({"sampler": torch.Generator().manual_seed(7)})
    torch.manual_seed(123)
    expected = torch.rand(3).tolist()
    torch.manual_seed(123)

    with pytest.raises(tracking.MismatchError, match=r"no generator named 'augment'.*'sampler'.*capture_rng_state"):
        tracking.restore_rng_state(saved, {"augment": torch.Generator()})

    assert torch.rand(3).tolist() == expected  # the global states were left as they were


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_load_restores_rng_and_rank_state_from_host_copies_whatever_map_location(s3_experiment: str) -> None:
    """A checkpoint read with map_location="meta" (a device with no data, as a GPU is to numpy) still
    gives RNG and rank states that restore: they never left the host; the weights did follow."""
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    rng = tracking.capture_rng_state({"sampler": generator})
    expected = draws(generator)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, extra={"rng": rng}, rank_state={"step": torch.tensor(5)})
    loaded = tracking.load(run.info.run_id, map_location="meta", mode="train")
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert loaded.extra["rng"]["torch"].device.type == "cpu"
    assert loaded.rank_state["step"].device.type == "cpu"
    tracking.restore_rng_state(loaded.extra["rng"], {"sampler": generator})
    assert draws(generator) == expected


class FakeCuda:
    """``count`` visible GPUs, each RNG state set recorded by device index."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.set: dict[int, list[int]] = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._set_all)

    def _set_rng_state(self, state: torch.Tensor, device: int = 0) -> None:
        assert state.device.type == "cpu"
        self.set[int(device)] = state.tolist()

    def _set_all(self, states: list[torch.Tensor]) -> None:
        if len(states) != torch.cuda.device_count():
            raise RuntimeError("invalid device ordinal")  # what torch does with more states than GPUs
        for device, state in enumerate(states):
            self._set_rng_state(state, device)


@pytest.mark.parametrize(("saved", "visible", "restored"), [(2, 1, [0]), (1, 2, [0]), (1, 0, []), (2, 2, [0, 1])])
def test_cuda_rng_states_go_to_the_gpus_that_exist(
    monkeypatch: pytest.MonkeyPatch, saved: int, visible: int, restored: list[int]
) -> None:
    state = tracking.capture_rng_state()
    state["cuda"] = [torch.full((4,), device, dtype=torch.uint8) for device in range(saved)]
    fake = FakeCuda(monkeypatch, visible)
    if saved == visible:
        tracking.restore_rng_state(on_accelerator(state))
    else:
        with pytest.warns(RuntimeWarning, match=f"{saved} GPU\\(s\\) and {visible} are visible here: restoring"):
            tracking.restore_rng_state(on_accelerator(state))
    assert fake.set == {device: [device] * 4 for device in restored}


def test_a_model_rebuilt_from_its_class_keeps_the_dtype_it_was_saved_in(s3_experiment: str) -> None:
    model = DigitsMLP(hidden=8, dropout=0.0).to(torch.bfloat16)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
    loaded = tracking.load(run.info.run_id)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("map_location", ["cuda:1", torch.device("cuda", 2), "mps"])
def test_a_device_this_machine_lacks_is_a_config_error_not_a_refused_file(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch, map_location: Any
) -> None:
    # Torch's "Attempting to deserialize object on CUDA device 1" read as a file torch.load refused: "which may
    # be code: do not unpickle it", for a healthy checkpoint asked onto a GPU the serving machine lacks.
    model = DigitsMLP()
    with mlflow.start_run() as run:
        tracking.log_state_dict(model)
        tracking.log_checkpoint(model, epoch=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    reads = [
        lambda: tracking.load_model(run.info.run_id, map_location=map_location),
        lambda: tracking.load_state_dict(run.info.run_id, map_location=map_location),
        lambda: tracking.load(run.info.run_id, map_location=map_location),
    ]
    for read in reads:
        with pytest.raises(tracking.ConfigError, match=r"map_location=.* but (this machine has 1 CUDA device|MPS)"):
            read()
