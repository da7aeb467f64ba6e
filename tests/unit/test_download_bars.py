"""What the MLflow path (``file://``, ``mlflow-artifacts:/``) prints while the library reads: nothing, unless asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from requests import HTTPError, Response

import tracking
from pipelines.models import Model
from tracking.storage.artifact_repo import MlflowStore

pytestmark = pytest.mark.unit

BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _logged_run(tmp_path: Path) -> tuple[str, str]:
    """A run on a file:// root with one checkpoint: its ID and the checkpoint's model ID."""
    experiment_id = mlflow.create_experiment("bars", artifact_location=(tmp_path / "artifacts").as_uri())
    model = Model(n_input_features=6)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        logged = tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
    return str(run.info.run_id), str(logged.model_id)


def test_a_load_on_the_mlflow_path_prints_no_download_bars_and_leaves_mlflows_own_as_they_were(
    tracking_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(BARS, raising=False)
    run_id, model_id = _logged_run(tmp_path)
    capsys.readouterr()
    assert tracking.load(run_id).epoch == 1
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    # Was: one tqdm bar per file read (manifests, checkpoint.pt), "Downloading artifacts: 100%|...| 1/1".
    assert "Downloading artifacts" not in capsys.readouterr().err
    assert BARS not in os.environ
    # The user's own download still draws MLflow's bar: nothing of the process was changed to quiet the library's.
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(tmp_path))
    assert "Downloading artifacts" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "drawn"), [("true", True), ("1", True), ("false", False)])
def test_the_users_own_choice_of_mlflows_bars_wins(
    tracking_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    drawn: bool,
) -> None:
    run_id, _ = _logged_run(tmp_path)
    monkeypatch.setenv(BARS, value)
    capsys.readouterr()
    assert tracking.load(run_id).epoch == 1
    assert ("Downloading artifacts" in capsys.readouterr().err) is drawn


def test_a_file_deleted_between_its_listing_and_its_proxied_download_is_missing_not_a_failed_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state_dict").mkdir()
    (tmp_path / "state_dict" / "manifest.json").write_bytes(b"{}")
    store = MlflowStore(tmp_path.as_uri(), owner="run r1")

    def as_the_proxy_answers(remote_file_path: str, local_path: str) -> Any:
        gone = Response()
        gone.status_code = 404
        raise HTTPError(f"404 Client Error: NOT FOUND for url: http://mlflow/{remote_file_path}", response=gone)

    monkeypatch.setattr(store.repo, "_download_file", as_the_proxy_answers)
    with pytest.raises(tracking.NotFoundError, match=r"run r1: .*state_dict/manifest.json: no such artifact"):
        store.read("state_dict/manifest.json")

    def failing(remote_file_path: str, local_path: str) -> Any:
        broken = Response()
        broken.status_code = 500
        raise HTTPError("500 Server Error", response=broken)

    monkeypatch.setattr(store.repo, "_download_file", failing)
    with pytest.raises(tracking.StorageError, match=r"500 Server Error.*retry"):
        store.read("state_dict/manifest.json")
