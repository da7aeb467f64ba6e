"""Checkpoints as MLflow logged models (issue #10): what MLflow itself shows of them, what the
registry and models:/ URIs load, what retention and failed saves leave, runs in the old layout,
and what latest/best cost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.conftest import BUCKET
from tests.unit.fault import interrupted
from tracking import layout
from tracking.errors import StorageError
from tracking.run import open_run
from tracking.storage.artifact_repo import MlflowStore
from tracking.storage.s3 import S3Store


def experiment_id_of(run_id: str) -> str:
    return str(MlflowClient().get_run(run_id).info.experiment_id)


def run_models(run_id: str, **search: Any) -> list[Any]:
    """The run's logged models as MLflow's own search returns them (not deleted ones)."""
    return list(
        MlflowClient().search_logged_models(
            experiment_ids=[experiment_id_of(run_id)], filter_string=f"source_run_id = '{run_id}'", **search
        )
    )


def model_with(epoch: int) -> Model:
    """A model whose bias says which epoch saved it."""
    model = Model(6)
    with torch.no_grad():
        model.linear.bias.fill_(float(epoch))
    return model


def bias(loaded: tracking.LoadedCheckpoint) -> float:
    return float(loaded.model.linear.bias.detach())


def log_three(losses: tuple[float, ...] = (0.9, 0.5, 0.7)) -> tuple[str, dict[int, str]]:
    """A run with checkpoints of epochs 1, 2, 3 monitored on val_loss; the run ID and epoch -> model ID."""
    ids = {}
    with mlflow.start_run() as run:
        for epoch, loss in enumerate(losses, start=1):
            logged = tracking.log_checkpoint(
                model_with(epoch), epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss"
            )
            assert logged.model_id is not None
            ids[epoch] = logged.model_id
    return str(run.info.run_id), ids


# ------------------------------------------------------------ what MLflow shows


def test_each_checkpoint_is_a_ready_logged_model_with_its_metric_and_best_is_mlflows_best(experiment: str) -> None:
    run_id, ids = log_three()
    models = run_models(run_id)
    assert sorted(m.model_id for m in models) == sorted(ids.values())
    for model in models:
        assert str(model.status) == "READY"
        assert model.source_run_id == run_id
        assert model.model_type == layout.CHECKPOINT_MODEL_TYPE
    by_id = {m.model_id: m for m in models}
    for epoch, loss in [(1, 0.9), (2, 0.5), (3, 0.7)]:
        model = by_id[ids[epoch]]
        assert model.name == f"checkpoint-epoch-000{epoch}"
        assert model.params[layout.PARAM_EPOCH] == str(epoch)
        assert {(m.key, m.value) for m in model.metrics or []} == {("val_loss", loss)}

    ranked = run_models(run_id, order_by=[{"field_name": "metrics.val_loss", "ascending": True}])
    best = tracking.load(run_id, "best")
    assert best.model_id == ranked[0].model_id == ids[2]
    assert (best.epoch, bias(best)) == (2, 2.0)
    assert [m.model_id for m in ranked] == [ids[2], ids[3], ids[1]]


# ------------------------------------------------------------ registry and models:/ URIs


def test_a_registered_checkpoint_loads_by_alias_and_version_while_latest_moves_on(experiment: str) -> None:
    run_id, ids = log_three()
    version = tracking.register(run_id, "seed-checkpoints", checkpoint=1, alias="champion")
    assert version.source == f"models:/{ids[1]}"  # the version is made from the checkpoint's logged model

    champion = tracking.load("models:/seed-checkpoints@champion")
    assert (champion.epoch, champion.model_id, champion.run_id, bias(champion)) == (1, ids[1], run_id, 1.0)
    first_version = tracking.load(f"models:/seed-checkpoints/{version.version}")
    assert (first_version.epoch, first_version.model_id) == (1, ids[1])
    latest = tracking.load(run_id)
    assert (latest.epoch, latest.model_id, bias(latest)) == (3, ids[3], 3.0)

    # The run logs on: the alias still loads the registered checkpoint.
    tracking.log_checkpoint(model_with(4), epoch=4, run_id=run_id)
    assert tracking.load(run_id).epoch == 4
    assert tracking.load("models:/seed-checkpoints@champion").model_id == ids[1]


def test_a_model_id_uri_loads_exactly_that_checkpoint(experiment: str) -> None:
    run_id, ids = log_three()
    for epoch, model_id in ids.items():
        loaded = tracking.load(f"models:/{model_id}")
        assert (loaded.epoch, loaded.model_id, loaded.run_id, bias(loaded)) == (epoch, model_id, run_id, float(epoch))


# ------------------------------------------------------------ retention


def bucket_keys() -> list[str]:
    import boto3

    s3 = boto3.client("s3", region_name="us-east-1")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def stored_under(experiment: str, tmp_path: Path, model_id: str) -> list[str]:
    """Whatever the artifact store holds under the experiment's ``models/<model_id>/``."""
    if experiment == "s3":
        return [key for key in bucket_keys() if key.startswith(f"exp/models/{model_id}/")]
    folder = tmp_path / "artifacts" / "models" / model_id
    return [str(p) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_retention_leaves_exactly_the_kept_models_and_no_objects_of_the_others(experiment: str, tmp_path: Path) -> None:
    saved: dict[int, str] = {}
    checkpointer = tracking.Checkpointer(keep_last=1, keep_best=1, monitor="val_loss")
    with mlflow.start_run() as run:
        for epoch, loss in enumerate([0.5, 0.3, 0.6, 0.4, 0.7], start=1):
            logged = checkpointer.save(model_with(epoch), epoch=epoch, metrics={"val_loss": loss})
            assert logged is not None and logged.model_id is not None
            saved[epoch] = logged.model_id
    run_id = run.info.run_id
    kept = {saved[2], saved[5]}  # best (0.3) and last
    assert {m.model_id for m in run_models(run_id)} == kept
    assert [c.model_id for c in tracking.list_checkpoints(run_id)] == [saved[2], saved[5]]
    assert tracking.load(run_id).model_id == saved[5] and tracking.load(run_id, "best").model_id == saved[2]
    for epoch in (1, 3, 4):
        assert stored_under(experiment, tmp_path, saved[epoch]) == [], epoch
        with pytest.raises(tracking.NotFoundError):
            tracking.load(f"models:/{saved[epoch]}")
    for model_id in kept:
        assert len(stored_under(experiment, tmp_path, model_id)) == 2  # checkpoint.pt, manifest.json
    if experiment == "s3":
        kept_prefixes = tuple(f"exp/models/{model_id}/" for model_id in kept)
        assert [k for k in bucket_keys() if k.startswith("exp/models/") and not k.startswith(kept_prefixes)] == []


# ------------------------------------------------------------ a save that fails midway


def test_an_upload_failing_midway_leaves_no_ready_model_and_latest_unchanged(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def connection_lost() -> None:
        raise StorageError("injected: the connection dropped halfway through checkpoint.pt")

    with mlflow.start_run() as run:
        first = tracking.log_checkpoint(model_with(1), epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")
        with monkeypatch.context() as patch:
            for cls in (MlflowStore, S3Store):
                patch.setattr(
                    cls, "write", interrupted(cls.write, "checkpoint-epoch-0002/checkpoint.pt", connection_lost)
                )
            with pytest.raises(tracking.StorageError, match=r"injected.*epoch 2 was not committed"):
                tracking.log_checkpoint(model_with(2), epoch=2, metrics={"val_loss": 0.1}, monitor="val_loss")
    run_id = run.info.run_id
    statuses = {m.name: str(m.status) for m in run_models(run_id)}
    assert statuses == {"checkpoint-epoch-0001": "READY", "checkpoint-epoch-0002": "FAILED"}
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[layout.TAG_LATEST] == tags[layout.TAG_BEST] == first.model_id
    assert tracking.load(run_id).model_id == first.model_id
    assert tracking.load(run_id, "best").model_id == first.model_id
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    with pytest.raises(tracking.NotFoundError, match="no committed checkpoint for epoch 2"):
        tracking.load(run_id, 2)


# ------------------------------------------------------------ runs in the old layout


@pytest.mark.parametrize("old", ["tag and files", "tag", "files"])
def test_a_run_in_the_old_layout_is_a_tracking_error_naming_it(experiment: str, old: str) -> None:
    with mlflow.start_run() as run:
        if "tag" in old:
            mlflow.set_tag(layout.TAG_LATEST, "checkpoints/epoch_0001")
    run_id = run.info.run_id
    if "files" in old:
        store = open_run(run_id).store
        store.write_bytes("checkpoints/epoch_0001/checkpoint.pt", b"a checkpoint of the old layout")
        store.write_bytes("checkpoints/epoch_0001/manifest.json", b"{}")
    calls: list[Callable[[], object]] = [
        lambda: tracking.load(run_id),
        lambda: tracking.load(run_id, 1),
        lambda: tracking.list_checkpoints(run_id),
    ]
    for call in calls:
        with pytest.raises(tracking.TrackingError, match=r"checkpoints/.*the layout before checkpoints became") as err:
            call()
        assert run_id in str(err.value) and not isinstance(err.value, tracking.NotFoundError)


# ------------------------------------------------------------ what latest and best cost


COUNTED = ("get_run", "get_logged_model", "search_logged_models")


def requests_of(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> Counter[str]:
    """The tracking-server requests (of the kinds a lookup makes) that ``call`` makes, by method."""
    counts: Counter[str] = Counter()
    with monkeypatch.context() as patch:
        for name in COUNTED:
            original = getattr(MlflowClient, name)

            def counting(
                self: MlflowClient, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any
            ) -> Any:
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(MlflowClient, name, counting)
        call()
    return counts


@pytest.mark.parametrize("which", ["latest", "best"])
def test_latest_and_best_cost_the_same_requests_with_1_and_30_checkpoints(
    experiment: str, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    costs = {}
    for count in (1, 30):
        with mlflow.start_run() as run:
            for epoch in range(1, count + 1):
                # val_loss falls to epoch 5, then rises: best is not the latest
                loss = abs(epoch - 5) / 10 + 0.1
                tracking.log_checkpoint(model_with(epoch), epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss")
        run_id = run.info.run_id
        expected = count if which == "latest" else min(count, 5)
        found: list[tracking.LoadedCheckpoint] = []

        def load(run_id: str = run_id, found: list[tracking.LoadedCheckpoint] = found) -> None:
            found.append(tracking.load(run_id, which))

        costs[count] = requests_of(monkeypatch, load)
        assert [loaded.epoch for loaded in found] == [expected]
        assert costs[count]["search_logged_models"] == 0, costs[count]  # the tags name the model
    assert costs[1] == costs[30]
    # One request for the run (its tags), one for the model the tag names.
    assert costs[1] == {"get_run": 1, "get_logged_model": 1}, costs[1]
