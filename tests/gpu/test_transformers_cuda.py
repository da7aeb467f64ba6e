"""The Hugging Face Trainer integration on a CUDA device: ``TrackingCallback`` mirrors a GPU training, a Trainer
resumed from ``checkpoint_folder(run, ...)`` repeats the straight run bit for bit, and ``tracking.load`` puts the
model on the device ``map_location`` names."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

import tracking
from pipelines import data
from pipelines.hf_model import DigitsClassifier
from tests.unit.test_transformers import StopAfter, losses, make_trainer, split, weights
from tracking.integrations.transformers import TrackingCallback, checkpoint_folder

pytestmark = pytest.mark.gpu
__all__ = ["split"]

DEVICE = "cuda"


@pytest.fixture
def deterministic(restored_determinism: None) -> dict[str, object]:
    """The Trainer's settings for a bit-exact run on the GPU (full_determinism: deterministic kernels, cuBLAS
    workspace); the process-wide switches they flip are put back after the test."""
    return {"use_cpu": DEVICE == "cpu", "full_determinism": True}


def test_resume_on_cuda_from_the_run_repeats_the_straight_run(
    s3_experiment: str, split: data.Split, tmp_path: Path, deterministic: dict[str, object]
) -> None:
    straight = make_trainer(split, tmp_path / "straight", [], epochs=4, **deterministic)
    straight.train()
    assert straight.model.device.type == DEVICE
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "first", [StopAfter(2), TrackingCallback()], epochs=4, **deterministic).train()
    run_id = run.info.run_id
    folder = checkpoint_folder(run_id, output_dir=tmp_path / "elsewhere")
    resumed = make_trainer(split, tmp_path / "elsewhere", [TrackingCallback(run_id=run_id)], epochs=4, **deterministic)
    resumed.train(resume_from_checkpoint=folder)
    assert resumed.model.device.type == DEVICE
    assert losses(resumed) == losses(straight)
    final, expected = weights(resumed.model), weights(straight.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2, 3, 4]
    # The run's latest checkpoint, rebuilt on the GPU and on the CPU: the trained weights, on that device.
    for device in (DEVICE, "cpu"):
        loaded = tracking.load(run_id, map_location=device)
        assert isinstance(loaded.model, DigitsClassifier) and loaded.epoch == 4
        assert {p.device.type for p in loaded.model.parameters()} == {device}
        assert all(torch.equal(loaded.model.state_dict()[k].cpu(), v.cpu()) for k, v in expected.items())
