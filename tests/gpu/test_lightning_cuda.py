"""The Lightning integration on a CUDA device: a Trainer on the GPU mirrored by ``MLflowCheckpoints``, resumed by
run ID through ``checkpoint_path``, repeats the straight fit bit for bit; ``tracking.load`` puts the module on the
device ``map_location`` names."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

import tracking
from tests.lightning_model import TinyLit, fit
from tests.unit.test_pipelines import assert_identical
from tracking.integrations.lightning import checkpoint_path

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"


def test_resume_by_run_id_on_cuda_matches_a_straight_fit_bit_for_bit(
    s3_experiment: str, tmp_path: Path, restored_determinism: None
) -> None:
    # The helper's Trainer has deterministic=True: deterministic kernels and cuBLAS workspace, process-wide.
    with mlflow.start_run():
        straight, straight_trainer = fit(4, tmp_path / "straight", accelerator=ACCELERATOR, save_top_k=-1)
    with mlflow.start_run() as run:
        fit(2, tmp_path / "first", accelerator=ACCELERATOR, save_top_k=-1)
    run_id = run.info.run_id
    path = checkpoint_path(run_id, to=tmp_path / "download")
    assert torch.load(path, weights_only=True, map_location="cpu")["epoch"] == 1
    with mlflow.start_run(run_id=run_id):
        resumed, resumed_trainer = fit(4, tmp_path / "second", accelerator=ACCELERATOR, save_top_k=-1, ckpt_path=path)
    assert {p.device.type for p in resumed.parameters()} == {DEVICE}
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert_identical(resumed_trainer.optimizers[0].state_dict(), straight_trainer.optimizers[0].state_dict(), "optim")
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [0, 1, 2, 3]
    # The run's latest checkpoint, rebuilt on the GPU and on the CPU: the fitted module's weights, on that device.
    for device in (DEVICE, "cpu"):
        loaded = tracking.load(run_id, map_location=device, mode="train")
        assert isinstance(loaded.model, TinyLit) and loaded.epoch == 3
        assert {p.device.type for p in loaded.model.parameters()} == {device}
        for name, value in resumed.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name].cpu(), value.cpu()), (device, name)
        assert loaded.optimizer is not None
        for state in loaded.optimizer.state.values():
            assert {v.device.type for k, v in state.items() if k != "step"} == {device}
