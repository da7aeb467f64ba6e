"""A LightningModule holding a ``torch.compile``d submodule: its checkpoints (keys under ``net._orig_mod.``) load into
the module built without compiling, optimizer included, and a fit resumed from the run goes on exactly."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import mlflow
import torch

import tracking
from tests.lightning_model import TinyLit, fit
from tests.unit.test_lightning import assert_same_training
from tracking.integrations.lightning import checkpoint_path
from tracking.state_keys import with_model_keys


class CompiledLit(TinyLit):
    """TinyLit whose network is compiled in its ``__init__`` (the eager backend: the same keys as inductor's, no
    C++ build in a unit test)."""

    def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__(hidden, lr)
        self.net = torch.compile(self.net, backend="eager")  # type: ignore[assignment]


def test_a_compiled_submodules_checkpoint_loads_into_the_module_built_without_compiling(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        trained, _ = fit(2, tmp_path, module=CompiledLit)
    run_id = run.info.run_id
    stored = torch.load(checkpoint_path(run_id, to=tmp_path / "download"), weights_only=True)["state_dict"]
    assert all(key.startswith("net._orig_mod.") for key in stored)  # Lightning's file as it saved it
    # For evaluation elsewhere, with no compiler: the plain module, its weights and its optimizer's state.
    loaded = tracking.load(run_id, model=TinyLit(), mode="train")
    assert type(loaded.model.net) is torch.nn.Sequential
    expected = {key.replace("_orig_mod.", ""): value for key, value in trained.state_dict().items()}
    assert loaded.model.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert isinstance(loaded.optimizer, torch.optim.Adam)
    assert loaded.optimizer.state_dict()["state"].keys() == trained.trainer.optimizers[0].state_dict()["state"].keys()
    # Rebuilt from the run alone it is the compiled module again.
    assert torch.equal(tracking.load(run_id).model.net._orig_mod[0].weight, trained.net._orig_mod[0].weight)


def test_a_fit_of_a_compiled_submodule_resumed_from_the_run_matches_a_straight_one(
    s3_experiment: str, tmp_path: Path
) -> None:
    with mlflow.start_run():
        straight, straight_trainer = fit(3, tmp_path / "straight", module=CompiledLit)
    with mlflow.start_run() as run:
        fit(2, tmp_path / "first", module=CompiledLit)
    run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id):
        path = checkpoint_path(run_id, to=tmp_path / "download")
        resumed, resumed_trainer = fit(3, tmp_path / "second", module=CompiledLit, ckpt_path=path)
    assert_same_training(straight, straight_trainer, resumed, resumed_trainer)


def test_a_plain_state_takes_the_keys_of_a_model_that_compiles_a_submodule() -> None:
    plain = TinyLit().state_dict()
    compiled = CompiledLit().state_dict()
    matched = with_model_keys(plain, compiled)
    assert list(matched) == list(compiled)
    # The per-module versions load_state_dict reads follow the keys.
    assert "net._orig_mod.0" in matched._metadata  # type: ignore[attr-defined]
    assert isinstance(matched, OrderedDict)
    model = CompiledLit()
    model.load_state_dict(matched)
    assert torch.equal(model.net._orig_mod[0].weight, plain["net.0.weight"])
