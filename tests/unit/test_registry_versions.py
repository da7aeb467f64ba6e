"""Registry versions load exactly the checkpoint they were made from, or say why they cannot."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking.cli import main
from tracking.errors import NotFoundError


def test_a_version_made_from_a_runs_uri_is_refused_not_the_runs_current_latest(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model, epoch=1)
        client = MlflowClient()
        client.create_registered_model("seed")
        version = client.create_model_version("seed", source=f"runs:/{run_id}/anything", run_id=run_id)
        tracking.log_checkpoint(model, epoch=2)  # latest moves on after the version was made
    with pytest.raises(NotFoundError, match=rf"version {version.version} of 'seed'.*names no checkpoint.*register"):
        tracking.load(f"models:/seed/{version.version}")
    # The run it names is still found for what takes a run (listing its checkpoints).
    assert [c.epoch for c in tracking.list_checkpoints(f"models:/seed/{version.version}")] == [1, 2]


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "bad alias!"])
def test_a_refused_alias_leaves_no_version_behind(experiment: str, alias: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    with pytest.raises(ValueError, match=rf"alias {alias!r} cannot be used"):
        tracking.register(run.info.run_id, "seed", checkpoint="latest", alias=alias)
    assert list(MlflowClient().search_model_versions("name = 'seed'")) == []
    cli = CliRunner().invoke(main, ["register", run.info.run_id, "seed", "--checkpoint", "latest", "--alias", alias])
    assert cli.exit_code == 2 and "cannot be used" in cli.output and "Traceback" not in cli.output
    assert list(MlflowClient().search_model_versions("name = 'seed'")) == []
