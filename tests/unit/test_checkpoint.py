"""Logging: the three ways of saving from the seed notes, on moto S3 (fast path) and file:// (MLflow path)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import DigitsMLP, Model
from tests.unit.conftest import BUCKET
from tracking.layout import TAG_BEST, TAG_LATEST


def trained_seed_model() -> tuple[Model, torch.optim.SGD]:
    torch.manual_seed(0)
    model = Model(n_input_features=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32, 1)).float()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def download(run_id: str, path: str, tmp_path: Path) -> bytes:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))
    return Path(local).read_bytes()


def download_model_file(model_id: str, name: str, tmp_path: Path) -> bytes:
    """A file of a checkpoint's logged model, fetched with plain MLflow (all of models:/<model_id>)."""
    dst = tmp_path / model_id
    if not dst.exists():
        dst.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(dst))
    return (dst / name).read_bytes()


def manifest_of(run_id: str, folder: str, tmp_path: Path) -> dict[str, Any]:
    return json.loads(download(run_id, f"{folder}/manifest.json", tmp_path / folder))  # type: ignore[no-any-return]


def checkpoint_manifest_of(model_id: str, tmp_path: Path) -> dict[str, Any]:
    return json.loads(download_model_file(model_id, "manifest.json", tmp_path))  # type: ignore[no-any-return]


def test_state_dict_loads_with_the_seed_code(experiment: str, tmp_path: Path) -> None:
    model, _ = trained_seed_model()
    with mlflow.start_run() as run:
        tracking.log_state_dict(model)
    raw = download(run.info.run_id, "state_dict/state_dict.pt", tmp_path)

    loaded_model = Model(n_input_features=6)  # seed section 5, verbatim apart from weights_only
    assert not torch.equal(loaded_model.linear.weight, model.linear.weight)
    loaded_model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    loaded_model.eval()
    assert torch.equal(loaded_model.linear.weight, model.linear.weight)

    manifest = manifest_of(run.info.run_id, "state_dict", tmp_path)
    assert manifest["files"]["state_dict.pt"] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert manifest["model"]["class"] == "pipelines.models:Model"
    assert manifest["model"]["init_kwargs"] == {"n_input_features": 6}


def test_a_state_dict_takes_numpy_and_tensor_integers_as_its_epoch_and_step(experiment: str, tmp_path: Path) -> None:
    import numpy as np

    with mlflow.start_run() as run:
        # Was: accepted by the check, then a TypeError from the manifest's JSON, with nothing committed.
        tracking.log_state_dict(Model(6), epoch=np.int64(3), step=torch.tensor(30))
    manifest = manifest_of(run.info.run_id, "state_dict", tmp_path)
    assert (manifest["epoch"], manifest["step"]) == (3, 30)


def test_state_dict_as_safetensors(experiment: str, tmp_path: Path) -> None:
    from safetensors.torch import load

    model, _ = trained_seed_model()
    with mlflow.start_run() as run:
        tracking.log_state_dict(model, format="safetensors")
    raw = download(run.info.run_id, "state_dict/state_dict.safetensors", tmp_path)
    assert torch.equal(load(raw)["linear.weight"], model.linear.weight)
    assert torch.equal(tracking.load_model(run.info.run_id).linear.weight, model.linear.weight)


class Killed(BaseException):
    """What a kill -9 leaves: nothing after the point where it lands runs."""


@pytest.mark.parametrize("format", ["torch", "safetensors"])
def test_a_state_dict_relog_killed_before_its_manifest_keeps_the_previous_one(
    experiment: str, format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracking import audit
    from tracking.run import open_run
    from tracking.storage import ArtifactStore

    model, _ = trained_seed_model()
    with mlflow.start_run() as run:
        tracking.log_state_dict(model, format=format)
        saved = model.linear.weight.detach().clone()
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        store_class = type(open_run(run.info.run_id).store)  # S3Store or MlflowStore, as the writer opens it
        real_write_bytes = store_class.write_bytes

        def killed_at_the_manifest(self: ArtifactStore, path: str, data: bytes) -> Any:
            if path == "state_dict/manifest.json":
                raise Killed
            return real_write_bytes(self, path, data)

        with monkeypatch.context() as patch:
            patch.setattr(store_class, "write_bytes", killed_at_the_manifest)
            with pytest.raises(Killed):
                tracking.log_state_dict(model, format=format)
        # The previous state dict still loads, and verify sees the new bytes as a leftover, not corruption.
        assert torch.equal(tracking.load_state_dict(run.info.run_id)["linear.weight"], saved)
        report = audit.verify(run.info.run_id)
        assert report.failures == {}
        assert [leftover.kind for leftover in report.leftovers] == [audit.UNCOMMITTED]
        # The next re-log commits and removes what the dead one and the replaced one left.
        tracking.log_state_dict(model, format=format)
    assert torch.equal(tracking.load_state_dict(run.info.run_id)["linear.weight"], model.linear.weight)
    report = audit.verify(run.info.run_id)
    assert report.failures == {} and report.leftovers == []
    assert len(tracking.load_state_dict(run.info.run_id)) == len(model.state_dict())


def test_checkpoint_loads_with_the_seed_code(experiment: str, tmp_path: Path) -> None:
    model, optimizer = trained_seed_model()
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, optimizer, epoch=7, metrics={"val_loss": 0.25}, step=21)
    assert logged.path == "checkpoint-epoch-0007" and logged.uri == f"models:/{logged.model_id}"
    raw = download_model_file(str(logged.model_id), "checkpoint.pt", tmp_path)

    # Seed section 6, with the weights_only=True that DESIGN.md requires.
    fresh = Model(n_input_features=6)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0)
    checkpoint = torch.load(io.BytesIO(raw), weights_only=True)
    fresh.load_state_dict(checkpoint["model_state"])
    fresh_optimizer.load_state_dict(checkpoint["optim_state"])
    assert checkpoint["epoch"] == 7
    assert torch.equal(fresh.linear.weight, model.linear.weight)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01
    momentum = optimizer.state[model.linear.weight]["momentum_buffer"]
    assert torch.equal(fresh_optimizer.state[fresh.linear.weight]["momentum_buffer"], momentum)

    manifest = checkpoint_manifest_of(str(logged.model_id), tmp_path)
    assert manifest["files"]["checkpoint.pt"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert manifest["files"]["checkpoint.pt"]["size"] == len(raw)
    assert (manifest["epoch"], manifest["step"], manifest["metrics"]) == (7, 21, {"val_loss": 0.25})
    assert manifest["optimizer"]["class"] == "torch.optim.sgd:SGD"
    assert manifest["optimizer"]["defaults"]["momentum"] == 0.9
    assert manifest["optimizer"]["param_groups"] == [{"params": ["linear.weight", "linear.bias"]}]
    assert {"torch", "mlflow", "python"} <= set(manifest["versions"])
    assert MlflowClient().get_run(run.info.run_id).data.tags[TAG_LATEST] == logged.model_id

    # The checkpoint is a READY logged model of the run that says what it is, with its metrics.
    model_info = MlflowClient().get_logged_model(str(logged.model_id))
    assert (model_info.name, str(model_info.status), model_info.source_run_id) == (
        "checkpoint-epoch-0007",
        "READY",
        run.info.run_id,
    )
    assert model_info.model_type == "pytorch-checkpoint"
    assert model_info.params == {"epoch": "7", "step": "21", "model_class": "pipelines.models:Model"}
    assert {(m.key, m.value) for m in model_info.metrics or []} == {("val_loss", 0.25)}
    assert model_info.artifact_location == logged.artifact_uri


def test_scheduler_scaler_and_extra_keys_are_recorded(experiment: str, tmp_path: Path) -> None:
    model = DigitsMLP(hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    with mlflow.start_run():
        logged = tracking.log_checkpoint(
            model, optimizer, epoch=1, scheduler=scheduler, scaler=scaler, extra={"global_step": 10}
        )
    raw = download_model_file(str(logged.model_id), "checkpoint.pt", tmp_path)
    checkpoint = torch.load(io.BytesIO(raw), weights_only=True)
    assert checkpoint["scheduler_state"]["step_size"] == 3
    assert "scale" in checkpoint["scaler_state"]
    assert checkpoint["global_step"] == 10
    manifest = checkpoint_manifest_of(str(logged.model_id), tmp_path)
    assert manifest["scheduler"] == {
        "class": "torch.optim.lr_scheduler:StepLR",
        "init_kwargs": {"step_size": 3, "gamma": 0.5},
    }
    assert manifest["model"]["init_kwargs"] == {
        "n_input_features": 64,
        "hidden": 16,
        "n_classes": 10,
        "dropout": 0.2,
    }
    assert manifest["extra_keys"] == ["global_step"]


def test_whole_model_loads_with_mlflow_pytorch(experiment: str) -> None:
    model, _ = trained_seed_model()
    with mlflow.start_run() as run:
        # requirements given: MLflow would infer them by loading the model in a subprocess (10+ s)
        tracking.log_model(model, pip_requirements=["torch"])
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model(x))
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.metadata["tracking"]["model"]["init_kwargs"] == {"n_input_features": 6}


def test_explicit_run_id_outside_an_active_run(experiment: str) -> None:
    model, optimizer = trained_seed_model()
    run = MlflowClient().create_run(mlflow.get_experiment_by_name(f"unit-{experiment}").experiment_id)
    tracking.log_checkpoint(model, optimizer, epoch=0, run_id=run.info.run_id)
    assert tracking.load(run.info.run_id).epoch == 0
    assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"


def test_uncapturable_init_kwargs_still_log_and_say_so(experiment: str) -> None:
    class Plain(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(width, 1)

    model = Plain(3)
    with mlflow.start_run() as run:
        logged = tracking.log_state_dict(model)
    assert logged.manifest.model["init_kwargs"] is None
    assert "model=" in logged.manifest.model["note"]
    with pytest.raises(tracking.NotFoundError, match="pass model="):
        tracking.load_model(run.info.run_id)
    assert torch.equal(tracking.load_model(run.info.run_id, model=Plain(3)).layer.weight, model.layer.weight)


def test_explicit_model_kwargs_must_be_json(experiment: str) -> None:
    model, _ = trained_seed_model()
    with mlflow.start_run(), pytest.raises(ValueError, match="JSON"):
        tracking.log_state_dict(model, model_kwargs={"n_input_features": object()})


def test_retention_keeps_last_three_and_best_two_after_twenty_saves(s3_experiment: str) -> None:
    model, optimizer = trained_seed_model()
    # val_loss is lowest at epochs 5 and 11, so those are the best two.
    losses = {epoch: 1.0 + epoch / 100 for epoch in range(1, 21)}
    losses[5], losses[11] = 0.1, 0.2
    checkpointer = tracking.Checkpointer(keep_last=3, keep_best=2, monitor="val_loss", mode="min")
    with mlflow.start_run() as run:
        for epoch in range(1, 21):
            checkpointer.save(model, optimizer, epoch=epoch, metrics={"val_loss": losses[epoch]})
    kept = {m.epoch: m.model_id for m in tracking.list_checkpoints(run.info.run_id)}
    assert list(kept) == [5, 11, 18, 19, 20]
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[TAG_LATEST] == kept[20]
    assert tags[TAG_BEST] == kept[5]
    # Only the kept checkpoints' logged models remain, and only their files are in the bucket.
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[s3_experiment], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert sorted(m.model_id for m in models) == sorted(kept.values())
    keys = {o["Key"] for o in _objects() if o["Key"].startswith("exp/models/")}
    assert keys == {
        f"exp/models/{model_id}/artifacts/{name}"
        for model_id in kept.values()
        for name in ("checkpoint.pt", "manifest.json")
    }
    assert not [o["Key"] for o in _objects() if o["Key"].startswith(f"exp/{run.info.run_id}/artifacts/checkpoints/")]


def test_retention_without_best_moves_the_best_tag_to_a_survivor(experiment: str) -> None:
    model, optimizer = trained_seed_model()
    checkpointer = tracking.Checkpointer(keep_last=2, monitor="val_loss")
    with mlflow.start_run() as run:
        for epoch, loss in enumerate([0.1, 0.5, 0.4, 0.3], start=1):
            checkpointer.save(model, optimizer, epoch=epoch, metrics={"val_loss": loss})
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [3, 4]
    assert tracking.load(run.info.run_id, "best").epoch == 4


def test_checkpointer_saves_every_n_epochs(experiment: str) -> None:
    model, optimizer = trained_seed_model()
    checkpointer = tracking.Checkpointer(every_n_epochs=3)
    with mlflow.start_run() as run:
        saved = [checkpointer.save(model, optimizer, epoch=e) is not None for e in range(1, 8)]
        checkpointer.save(model, optimizer, epoch=8, force=True)
    assert saved == [False, False, True, False, False, True, False]
    assert [m.epoch for m in tracking.list_checkpoints(run.info.run_id)] == [3, 6, 8]


def test_saves_of_one_epoch_are_charted_at_their_chart_step(experiment: str) -> None:
    model, optimizer = trained_seed_model()
    checkpointer = tracking.Checkpointer(every_n_steps=5)
    with mlflow.start_run() as run:
        with pytest.raises(ValueError, match=r"chart_step must be a non-negative int.*'5'"):
            checkpointer.save(model, optimizer, epoch=1, step=5, metrics={"loss": 0.5}, chart_step="5")  # type: ignore[arg-type]
        for step, loss in ((5, 0.5), (10, 0.4)):  # two saves in epoch 1, charted by global step
            checkpointer.save(model, optimizer, epoch=1, step=step, metrics={"loss": loss}, chart_step=step)
        tracking.log_checkpoint(
            model, optimizer, epoch=1, step=15, keyed_by="step", metrics={"loss": 0.3}, chart_step=15
        )
    saved = tracking.list_checkpoints(run.info.run_id)
    assert [(c.epoch, c.step) for c in saved] == [(1, 5), (1, 10), (1, 15)]
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(5, 0.5), (10, 0.4), (15, 0.3)]
    for checkpoint in saved:
        model_metrics = client.get_logged_model(str(checkpoint.model_id)).metrics or []
        assert [(m.key, m.step) for m in model_metrics] == [("loss", checkpoint.step)]


def _objects() -> list[dict[str, Any]]:
    import boto3

    return boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket=BUCKET).get("Contents", [])


def test_moto_bucket_receives_plain_mlflow_artifacts(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "notes/readme.txt")
    keys = [o["Key"] for o in _objects()]
    assert f"exp/{run.info.run_id}/artifacts/notes/readme.txt" in keys


def test_models_without_init_arguments_need_no_decorator(experiment: str) -> None:
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    class Defaults(torch.nn.Module):
        def __init__(self, width: int = 2) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(width, 2)

    with mlflow.start_run():
        assert tracking.log_state_dict(Fixed()).manifest.model["init_kwargs"] == {}
        # Called with a non-default width: recording {} would rebuild the wrong model.
        assert tracking.log_state_dict(Defaults(width=5)).manifest.model["init_kwargs"] is None


def test_a_process_that_opens_run_after_run_keeps_only_the_last_few(s3_experiment: str) -> None:
    from tracking import run as runs

    client = MlflowClient()
    run_ids = [client.create_run(s3_experiment).info.run_id for _ in range(runs._OPENED_KEPT + 5)]
    for run_id in run_ids:
        runs.open_run(run_id, reuse=True)
    runs.open_run(run_ids[-runs._OPENED_KEPT], reuse=True)  # the oldest kept, used again: kept longest
    runs.open_run(run_ids[0])
    kept = [key[2] for key in runs._opened]
    assert len(kept) == runs._OPENED_KEPT
    assert kept[-2:] == [run_ids[-runs._OPENED_KEPT], run_ids[0]]
    assert set(kept) == {run_ids[0], run_ids[-runs._OPENED_KEPT], *run_ids[-runs._OPENED_KEPT + 2 :]}


def test_a_save_to_a_run_deleted_meanwhile_says_so_and_restoring_it_brings_back_its_checkpoints(
    experiment: str,
) -> None:
    model = Model(6)
    client = MlflowClient()
    run_id = client.create_run(mlflow.get_experiment_by_name(f"unit-{experiment}").experiment_id).info.run_id
    checkpointer = tracking.Checkpointer(keep_last=1, run_id=run_id)
    checkpointer.save(model, epoch=1, metrics={"val_loss": 0.5})
    client.delete_run(run_id)  # in the MLflow UI, while the training goes on
    for save in (
        lambda: checkpointer.save(model, epoch=2, metrics={"val_loss": 0.4}),
        lambda: tracking.log_checkpoint(model, epoch=2, run_id=run_id),
    ):
        with pytest.raises(tracking.NotFoundError, match=rf"run {run_id} is deleted.*restore it in the MLflow UI"):
            save()
    client.restore_run(run_id)
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    assert tracking.load(run_id).epoch == 1


def test_a_load_from_a_run_of_a_deleted_experiment_says_to_restore_the_experiment(s3_experiment: str) -> None:
    # MLflow marks the runs of a deleted experiment deleted too: "restore it (the run) in the MLflow UI" sent
    # users to restore a run, which MLflow refuses while its experiment stays deleted.
    client = MlflowClient()
    run_id = client.create_run(s3_experiment).info.run_id
    checkpointer = tracking.Checkpointer(keep_last=1, run_id=run_id)
    checkpointer.save(Model(6), epoch=1, metrics={"val_loss": 0.5})
    (saved,) = tracking.list_checkpoints(run_id)
    client.delete_experiment(s3_experiment)

    restore_experiment = rf"experiment 'unit-s3' \(ID {s3_experiment}\), which is deleted.*" + re.escape(
        f"`mlflow experiments restore --experiment-id {s3_experiment}`"
    )
    for use in (
        lambda: tracking.load(run_id),
        lambda: tracking.list_checkpoints(run_id),
        lambda: tracking.list_checkpoints(f"models:/{saved.model_id}"),  # a models:/ URI's run
    ):
        with pytest.raises(tracking.NotFoundError, match=rf"run {run_id} is in {restore_experiment}"):
            use()
    # A writer that opened the run before the experiment was deleted is told the same.
    with pytest.raises(tracking.NotFoundError, match=re.escape(f"--experiment-id {s3_experiment}`")):
        checkpointer.save(Model(6), epoch=2, metrics={"val_loss": 0.4})
    # A run deleted on its own is the run to restore.
    client.restore_experiment(s3_experiment)
    client.delete_run(run_id)
    with pytest.raises(tracking.NotFoundError, match=re.escape(f"`mlflow runs restore --run-id {run_id}`")):
        tracking.load(run_id)


def test_a_checkpoint_records_mlflows_version_under_mlflow_skinny(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow-skinny (a server's or a container's slimmer install) is the same MLflow, under another distribution
    name: its version is recorded as mlflow's."""
    from importlib import metadata

    from tracking import manifest

    def version(name: str) -> str:
        if name == "mlflow":
            raise metadata.PackageNotFoundError(name)  # as where only mlflow-skinny is installed
        return original(name)

    original = metadata.version
    monkeypatch.setattr(metadata, "version", version)
    manifest._installed_versions.cache_clear()
    try:
        assert manifest.versions()["mlflow"] == mlflow.__version__
    finally:
        monkeypatch.undo()
        manifest._installed_versions.cache_clear()


def test_numpy_and_tensor_integers_are_epochs_and_steps_saved_as_ints(s3_experiment: str) -> None:
    import numpy as np

    model = Model(6)
    with mlflow.start_run() as run:
        # What loops hand over: a numpy epoch from np.arange, a trainer's global step as a 0-d tensor.
        logged = tracking.log_checkpoint(model, epoch=np.int64(1), step=torch.tensor(10), chart_step=np.int32(10))
        checkpointer = tracking.Checkpointer(every_n_epochs=2)
        assert checkpointer.save(model, epoch=np.int64(1)) is None  # not due; was: ValueError "must be ... int"
        checkpointer.save(model, epoch=np.int64(2), step=torch.tensor(20, dtype=torch.int32))
    assert isinstance(logged, tracking.LoggedCheckpoint)
    assert (type(logged.manifest.epoch), type(logged.manifest.step)) == (int, int)
    run_id = run.info.run_id
    # Read back from checkpoint.pt by torch.load(weights_only=True), which a numpy scalar there would fail.
    first = tracking.load(run_id, checkpoint=np.int64(1))
    assert (first.epoch, first.step, type(first.epoch), type(first.step)) == (1, 10, int, int)
    assert tracking.load(run_id, step=torch.tensor(20)).epoch == 2
    # Still refused, with the same messages: bools of any kind, floats, negatives, tensors of several numbers.
    for bad in (True, np.bool_(True), torch.tensor(True), 1.0, np.float64(1), torch.tensor(1.0), -1, np.int64(-1)):
        with pytest.raises(ValueError, match="epoch must be a non-negative int"):
            tracking.log_checkpoint(model, epoch=bad, run_id=run_id)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            tracking.log_checkpoint(model, epoch=3, step=bad, run_id=run_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        tracking.Checkpointer().save(model, epoch=torch.tensor([1, 2]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="checkpoint must be 'latest', 'best' or an epoch"):
        tracking.load(run_id, checkpoint=np.bool_(True))  # type: ignore[arg-type]
