"""Every ``tracking`` command against a real stack: exit codes, key lines, and ``--json`` parsed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner, Result
from mlflow import MlflowClient

import tracking
from pipelines.models import Model
from tests.logs import messages_of
from tracking.cli import main
from tracking.localstack import LocalStack

pytestmark = pytest.mark.integration


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def as_json(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(params=["sqlite", "proxied"])
def logged_run(request: pytest.FixtureRequest, use_stack: Callable[[LocalStack], LocalStack]) -> tuple[str, str]:
    """A run with checkpoints at epochs 1..4 (val_loss 0.9, 0.5, 0.7, 0.8) and a state dict; (run ID, experiment)."""
    use_stack(request.getfixturevalue(f"stack_{request.param}"))
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        for epoch, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)]:
            tracking.log_checkpoint(model, optimizer, epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss")
        tracking.log_state_dict(model)
    return str(run.info.run_id), experiment


def test_every_command_on_a_real_stack(logged_run: tuple[str, str], tmp_path: Path) -> None:
    run_id, experiment = logged_run

    [listed] = as_json("runs", "--experiment", experiment)
    assert (listed["run_id"], listed["status"], listed["checkpoints"]) == (run_id, "FINISHED", 4)
    assert (listed["latest_epoch"], listed["best_epoch"], listed["best_value"]) == (4, 2, 0.5)
    assert listed["size_bytes"] > 0
    plain = invoke("runs", "--experiment", experiment)
    assert plain.exit_code == 0 and run_id in plain.stdout and "epoch 2 val_loss=0.5" in plain.stdout

    checkpoints = as_json("checkpoints", run_id)
    assert [(c["key"], c["keyed_by"], c["epoch"]) for c in checkpoints] == [(e, "epoch", e) for e in (1, 2, 3, 4)]
    marks = {c["epoch"]: (c["latest"], c["best"]) for c in checkpoints}
    assert marks[4] == (True, False) and marks[2] == (False, True)
    by_epoch = {c["epoch"]: c["model_id"] for c in checkpoints}

    shown = as_json("show", run_id, "--checkpoint", "best")
    assert shown["model_id"] == by_epoch[2] and shown["manifest"]["metrics"] == {"val_loss": 0.5}
    pinned = invoke("show", f"models:/{by_epoch[3]}")
    assert pinned.exit_code == 0 and json.loads(pinned.stdout)["epoch"] == 3

    verified = as_json("verify", run_id)
    assert verified["intact"] and len(verified["files"]) == 5 and verified["leftovers"] == []

    downloaded = as_json("download", run_id, "--checkpoint", "best", "--to", str(tmp_path / "best"))
    assert downloaded["model_id"] == by_epoch[2]
    state = torch.load(tmp_path / "best" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert json.loads((tmp_path / "best" / "manifest.json").read_text())["epoch"] == 2
    again = invoke("download", run_id, "--checkpoint", "best", "--to", str(tmp_path / "best"))
    assert again.exit_code == 1 and "--force" in again.stderr

    planned = as_json("gc", run_id, "--keep-last", "1", "--keep-best", "1", "--dry-run")
    assert [d["epoch"] for d in planned["deleted"]] == [1, 3]
    assert [c["epoch"] for c in as_json("checkpoints", run_id)] == [1, 2, 3, 4], "--dry-run changed nothing"
    done = invoke("gc", run_id, "--keep-last", "1", "--keep-best", "1")
    assert done.exit_code == 0 and done.stdout.splitlines()[-1] == f"run {run_id}: 2 checkpoints deleted"
    assert [c["epoch"] for c in as_json("checkpoints", run_id)] == [2, 4]
    models = MlflowClient().search_logged_models(
        [mlflow.get_experiment_by_name(experiment).experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert sorted(m.name for m in models) == ["checkpoint-epoch-0002", "checkpoint-epoch-0004"]

    name = f"cli-model-{uuid.uuid4().hex[:6]}"
    # MLflow's own handler writes to the real stderr, past CliRunner: listen on its logger.
    with messages_of("mlflow.store.model_registry.abstract_store") as notes:
        registered = as_json("register", run_id, name, "--checkpoint", "best", "--alias", "champion")
    assert not [m for m in notes if m.startswith("Waiting up to")], "MLflow's wait note is printed"
    assert registered["uri"] == f"models:/{name}@champion"
    assert (registered["checkpoint"], registered["key"], registered["keyed_by"]) == (
        "checkpoint-epoch-0002",
        2,
        "epoch",
    )
    assert MlflowClient().get_model_version(name, registered["version"]).tags == registered["tags"]
    assert tracking.load(f"models:/{name}@champion").epoch == 2
    assert tracking.load(run_id).epoch == 4


def test_errors_name_the_run_and_exit_1(logged_run: tuple[str, str]) -> None:
    run_id, _ = logged_run
    missing = invoke("show", run_id, "--checkpoint", "3")
    assert missing.exit_code == 0  # epoch 3 exists
    gone = invoke("show", run_id, "--checkpoint", "9")
    assert gone.exit_code == 1 and run_id in gone.stderr and gone.stderr.count("\n") == 1
    unknown = invoke("checkpoints", "f" * 32)
    assert unknown.exit_code == 1 and "not found" in unknown.stderr
    assert invoke("gc", run_id).exit_code == 2  # neither --keep-last nor --keep-best
