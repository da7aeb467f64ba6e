"""Loads that adopt the downloaded tensors instead of copying them, and when they must not."""

from __future__ import annotations

import mlflow
import pytest
import torch

import tracking


class Tied(torch.nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(8, 8, bias=False)
        self.decode = torch.nn.Linear(8, 8, bias=False)
        if tie:
            self.decode.weight = self.encode.weight


def test_load_adopts_the_weights_and_keeps_the_parameter_objects(experiment: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 32)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)

    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    loaded = tracking.load(run.info.run_id, model=model, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))

    assert loaded.model is model
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert loaded.optimizer is not None
    model.train()
    model(torch.randn(8, 32)).sum().backward()
    loaded.optimizer.step()  # trains in place, on the adopted weights
    assert not torch.equal(saved["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.parametrize("tie_when_loading", [True, False])
def test_tied_weights_stay_as_the_loading_model_ties_them(experiment: str, tie_when_loading: bool) -> None:
    model = Tied()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)

    target = Tied(tie=tie_when_loading)
    tracking.load(run.info.run_id, model=target)

    assert torch.equal(target.encode.weight, model.encode.weight)
    assert torch.equal(target.decode.weight, model.encode.weight)
    with torch.no_grad():
        target.encode.weight.add_(1.0)
    # Loaded into separate parameters, the two must not end up sharing memory.
    assert torch.equal(target.decode.weight, target.encode.weight) == tie_when_loading


def test_a_load_through_mlflows_repository_adopts_the_downloaded_buffer_too(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlflow-artifacts:/ and file:// roots: the download was read-only bytes, so torch.load copied every tensor
    # out of it and a large checkpoint was held twice over at the load's peak.
    from tracking import zerocopy

    buffers: list[memoryview] = []
    real = zerocopy.load_sharing

    def spy(data: object, map_location: str) -> object:
        buffers.append(memoryview(data))  # type: ignore[arg-type]
        return real(data, map_location)  # type: ignore[arg-type]

    monkeypatch.setattr(zerocopy, "load_sharing", spy)
    model = torch.nn.Linear(256, 256)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
    loaded = tracking.load(run.info.run_id, model=torch.nn.Linear(256, 256))

    assert len(buffers) == 1 and not buffers[0].readonly
    start = torch.frombuffer(buffers[0], dtype=torch.uint8).data_ptr()
    weight = loaded.model.weight
    assert start <= weight.data_ptr() < start + len(buffers[0])
    assert torch.equal(weight, model.weight)
