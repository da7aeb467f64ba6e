"""Log and load against the real stack: MLflow server + SeaweedFS (sqlite, PostgreSQL, proxied)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import DigitsMLP, Model
from tracking import catalog
from tracking.layout import CHECKPOINT_MODEL_TYPE, TAG_BEST, TAG_LATEST, TAG_LATEST_EPOCH, checkpoint_name
from tracking.localstack import LocalStack
from tracking.run import open_run
from tracking.storage.s3_client import s3_client

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def experiment_id(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> str:
    s3_client.cache_clear()
    experiment = mlflow.create_experiment(f"roundtrip-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", experiment)
    return experiment


def artifact_bytes(run_id: str, path: str) -> bytes:
    """The stored bytes, fetched through MLflow's own client (not ours)."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_bytes()


def model_bytes(artifact_uri: str, path: str) -> bytes:
    """A logged model's stored file, fetched through MLflow's own client (not ours)."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{path}")).read_bytes()


@pytest.mark.smoke(stack="sqlite")  # make test: one real-stack path
def test_everything_lands_in_the_bucket_and_loads_with_the_seed_code(
    stack: LocalStack, experiment_id: str, s3_keys: Callable[[LocalStack, str], list[str]]
) -> None:
    torch.manual_seed(0)
    model = Model(n_input_features=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    with mlflow.start_run() as run:
        tracking.log_state_dict(model)
        logged = tracking.log_checkpoint(model, optimizer, epoch=7, metrics={"val_loss": 0.3})
        # Requirements given: MLflow would infer them by loading the model in a subprocess (10+ s), its own
        # business, not this test's.
        tracking.log_model(model, pip_requirements=["torch"])
    run_id = run.info.run_id

    # The checkpoint is a READY logged model of the run, of the checkpoint type, named for its epoch.
    assert logged.model_id is not None and logged.artifact_uri is not None
    stored = MlflowClient().get_logged_model(logged.model_id)
    assert (stored.name, stored.model_type, str(stored.status)) == (
        checkpoint_name(7),
        CHECKPOINT_MODEL_TYPE,
        "READY",
    )
    assert stored.source_run_id == run_id and stored.params["epoch"] == "7"
    assert MlflowClient().get_run(run_id).data.tags[TAG_LATEST] == logged.model_id

    keys = s3_keys(stack, "mlartifacts/")
    assert f"mlartifacts/{experiment_id}/{run_id}/artifacts/state_dict/state_dict.pt" in keys
    # Its files sit in the logged model's own artifact location, not under the run's.
    for name in ("checkpoint.pt", "manifest.json"):
        assert f"mlartifacts/{experiment_id}/models/{logged.model_id}/artifacts/{name}" in keys, name
    assert not any(f"{run_id}/artifacts/checkpoints/" in key for key in keys)
    assert any(key.endswith("/artifacts/data/model.pth") for key in keys)

    raw = model_bytes(logged.artifact_uri, "checkpoint.pt")
    checkpoint = torch.load(io.BytesIO(raw), weights_only=True)
    fresh = Model(n_input_features=6)
    fresh.load_state_dict(checkpoint["model_state"])
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0)
    fresh_optimizer.load_state_dict(checkpoint["optim_state"])
    assert checkpoint["epoch"] == 7 and torch.equal(fresh.linear.weight, model.linear.weight)
    manifest = json.loads(model_bytes(logged.artifact_uri, "manifest.json"))
    assert manifest["files"]["checkpoint.pt"] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}

    state = torch.load(io.BytesIO(artifact_bytes(run_id, "state_dict/state_dict.pt")), weights_only=True)
    assert torch.equal(state["linear.weight"], model.linear.weight)
    whole = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.randn(3, 6)
    assert torch.equal(whole(x), model(x))
    assert torch.equal(tracking.load_model(run_id)(x), model(x))
    assert torch.equal(tracking.load(f"models:/{logged.model_id}").model(x), model(x))


def test_multipart_upload_and_ranged_load_on_seaweedfs(
    stack: LocalStack, experiment_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
    torch.manual_seed(0)
    model = DigitsMLP(n_input_features=64, hidden=1024)  # ~4.5 MB of weights, ~13.5 MB with Adam state
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, optimizer, epoch=1)
    assert logged.manifest.files["checkpoint.pt"].size > 10 * 1024 * 1024
    loaded = tracking.load(run.info.run_id)
    assert loaded.optimizer is not None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    saved, restored = optimizer.state_dict()["state"], loaded.optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i]["exp_avg"], saved[i]["exp_avg"]) for i in saved)


def test_retention_and_failed_upload_on_the_real_store(
    stack: LocalStack,
    experiment_id: str,
    monkeypatch: pytest.MonkeyPatch,
    s3_keys: Callable[[LocalStack, str], list[str]],
) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(keep_last=3, keep_best=2, monitor="val_loss")
    losses = {epoch: 1.0 + epoch / 100 for epoch in range(1, 21)}
    losses[5], losses[11] = 0.1, 0.2
    with mlflow.start_run() as run:
        for epoch in range(1, 21):
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": losses[epoch]})

        def broken_save(obj: Any, stream: Any) -> None:
            stream.write(b"partial bytes")
            raise ConnectionResetError("injected: connection lost mid-upload")

        with monkeypatch.context() as patch:
            patch.setattr(torch, "save", broken_save)
            with pytest.raises((tracking.StorageError, ConnectionResetError)):
                tracking.log_checkpoint(model, epoch=21)
    run_id = run.info.run_id
    kept = tracking.list_checkpoints(run_id)
    assert [m.epoch for m in kept] == [5, 11, 18, 19, 20]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[TAG_LATEST] == kept[-1].model_id and tags[TAG_LATEST_EPOCH] == "20"
    assert tags[TAG_BEST] == kept[0].model_id
    assert tracking.load(run_id).epoch == 20
    assert tracking.load(run_id, "best").epoch == 5

    handle = open_run(run_id)
    # The failed save's logged model is FAILED, with no file left in its artifact location.
    failed = catalog.search(handle, key=21, status=None)
    assert [m.status for m in failed] == [catalog.FAILED]
    assert failed[0].store.list_files("") == []
    # Retention deleted the other 15 logged models (they vanish from search) and every one of their files.
    assert sorted(m.epoch for m in catalog.search(handle, status=None) if m.epoch is not None) == [
        5,
        11,
        18,
        19,
        20,
        21,
    ]
    models = f"mlartifacts/{experiment_id}/models/"
    owners = {key[len(models) :].split("/", 1)[0] for key in s3_keys(stack, models)}
    assert owners == {m.model_id for m in kept}, "objects of deleted or failed checkpoints remain"


CHILD = textwrap.dedent(
    """
    import sys, torch, tracking
    import pipelines.models  # the model's code: the loader never imports a module a manifest names
    loaded = tracking.load(sys.argv[1])
    torch.save({"out": loaded.model(torch.load(sys.argv[2], weights_only=True)),
                "training": loaded.model.training, "epoch": loaded.epoch}, sys.argv[3])
    """
)


@pytest.mark.smoke(stack="sqlite")  # make test: one real-stack path
def test_fresh_process_gets_the_same_model_back(stack: LocalStack, experiment_id: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = DigitsMLP(hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(16, 64)), torch.randint(0, 10, (16,))).backward()
        optimizer.step()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=3)
    x = torch.randn(5, 64)
    torch.save(x, tmp_path / "x.pt")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, run.info.run_id, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    model.eval()
    assert not torch.equal(DigitsMLP(hidden=32).eval()(x), model(x))
    assert (result["training"], result["epoch"]) == (False, 3)
    assert torch.equal(result["out"], model(x))
