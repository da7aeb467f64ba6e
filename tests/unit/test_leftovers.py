"""What dead saves leave behind: reported by verify, removed by clean_leftovers, committed data untouched."""

from __future__ import annotations

from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tests.unit.conftest import BUCKET
from tracking import audit, layout
from tracking.cli import main
from tracking.config import TrackingConfig
from tracking.errors import TrackingError
from tracking.run import open_run
from tracking.selection import find_checkpoint
from tracking.storage import open_store
from tracking.uri import parse_s3_uri

RETRACTED_STATE = f"{layout.STATE_DICT_DIR}/{layout.STATE_DICT_FILES['torch']}"


def log_run(*, end: bool = True) -> tuple[str, dict[int, dict[str, torch.Tensor]]]:
    """A run with committed checkpoints at epochs 1 and 2; their model states, to compare after cleaning."""
    model = Model(6)
    checkpointer = tracking.Checkpointer(monitor="val_loss")
    states: dict[int, dict[str, torch.Tensor]] = {}
    run = mlflow.start_run()
    for epoch, loss in [(1, 0.5), (2, 0.2)]:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        checkpointer.save(model, epoch=epoch, metrics={"val_loss": loss})
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    if end:
        mlflow.end_run()
    return str(run.info.run_id), states


def dead_save(run_id: str, epoch: int, status: str | None = None) -> Any:
    """The logged model a save of ``epoch`` creates before its data (PENDING), as MLflow returns it."""
    client = MlflowClient()
    model = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id,
        name=layout.checkpoint_name(epoch),
        source_run_id=run_id,
        params={layout.PARAM_EPOCH: str(epoch)},
        model_type=layout.CHECKPOINT_MODEL_TYPE,
    )
    if status is not None:
        client.finalize_logged_model(model.model_id, status)
    return model


def label(model: Any) -> str:
    return f"{model.name} ({model.model_id})"


def kill_mid_save(s3: Any, run_id: str) -> tuple[Any, Any]:
    """What two dead saves leave: one killed mid-upload (a multipart upload with one part) and one
    killed before its manifest (its data), each a PENDING logged model."""
    upload, orphan = dead_save(run_id, 4), dead_save(run_id, 5)
    root = parse_s3_uri(upload.artifact_location)
    key = root.join(layout.CHECKPOINT_FILE).key
    created = s3.create_multipart_upload(Bucket=root.bucket, Key=key)
    s3.upload_part(Bucket=root.bucket, Key=key, UploadId=created["UploadId"], PartNumber=1, Body=b"x" * 1024)
    root = parse_s3_uri(orphan.artifact_location)
    s3.put_object(Bucket=root.bucket, Key=root.join(layout.CHECKPOINT_FILE).key, Body=b"half a checkpoint")
    return upload, orphan


def run_models(run_id: str) -> list[str]:
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return sorted(m.model_id for m in models)


def objects_of(s3: Any, model_ids: list[str]) -> list[str]:
    """The bucket's objects under the experiment's models/ prefix that belong to ``model_ids``."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="exp/models/"):
        found += [o["Key"] for o in page.get("Contents", []) if o["Key"].split("/")[2] in model_ids]
    return found


def assert_committed_intact(run_id: str, states: dict[int, dict[str, torch.Tensor]]) -> None:
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == sorted(states)
    for epoch, state in states.items():
        loaded = tracking.load(run_id, epoch).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), f"epoch {epoch} changed"
    report = audit.verify(run_id)
    assert report and not report.failures and not report.leftovers


def test_verify_reports_leftovers_and_clean_removes_only_them(s3_experiment: str, mocked_s3: Any) -> None:
    run_id, states = log_run()
    committed = run_models(run_id)
    upload, orphan = kill_mid_save(mocked_s3, run_id)

    report = audit.verify(run_id)
    assert not report.failures
    assert sorted(report.leftovers, key=str) == [
        audit.Leftover(label(upload), audit.NOT_COMMITTED_MODEL),
        audit.Leftover(f"{label(upload)}/{layout.CHECKPOINT_FILE}", audit.UNFINISHED_UPLOAD),
        audit.Leftover(label(orphan), audit.NOT_COMMITTED_MODEL),
    ]
    assert not any(upload.model_id in path or orphan.model_id in path for path in report)  # not in the file report

    removed = audit.clean_leftovers(run_id)
    assert sorted(removed) == sorted(str(leftover) for leftover in report.leftovers)
    assert mocked_s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert objects_of(mocked_s3, [upload.model_id, orphan.model_id]) == []
    assert run_models(run_id) == committed
    assert_committed_intact(run_id, states)
    assert audit.clean_leftovers(run_id) == []


def test_data_without_manifest_on_the_mlflow_path(experiment: str) -> None:
    """Both stores: a checkpoint whose manifest was retracted, a stray file beside a committed
    checkpoint, a save killed before its manifest, and a state dict never committed."""
    run_id, states = log_run()
    committed = run_models(run_id)
    config = TrackingConfig.from_env()
    open_run(run_id).store.write_bytes(RETRACTED_STATE, b"half a state dict")
    first = find_checkpoint(run_id, 1)
    first.store.write_bytes("stray.pt", b"not listed")
    orphan = dead_save(run_id, 5)
    open_store(orphan.artifact_location, config).write_bytes(layout.CHECKPOINT_FILE, b"half a checkpoint")
    # A save whose retraction deleted the manifest, then could not mark the model FAILED.
    retracted = dead_save(run_id, 6)
    open_store(retracted.artifact_location, config).write_bytes(layout.CHECKPOINT_FILE, b"a whole checkpoint")
    MlflowClient().finalize_logged_model(retracted.model_id, "READY")
    assert tracking.load(run_id).epoch == 2
    with pytest.raises(tracking.NotFoundError):
        tracking.load(run_id, 6)

    assert [str(x) for x in audit.verify(run_id).leftovers] == [
        f"{RETRACTED_STATE} ({audit.UNCOMMITTED})",
        f"checkpoint-epoch-0001 ({first.model_id})/stray.pt ({audit.UNCOMMITTED})",
        f"{label(orphan)} ({audit.NOT_COMMITTED_MODEL})",
        f"{label(retracted)} ({audit.UNFINISHED_DELETION})",
    ]
    assert len(audit.clean_leftovers(run_id)) == 4
    assert run_models(run_id) == committed
    assert open_store(orphan.artifact_location, config).list_files("") == []
    assert open_store(retracted.artifact_location, config).list_files("") == []
    assert sorted(first.store.list_files("")) == [layout.CHECKPOINT_FILE, layout.MANIFEST_FILE]
    assert_committed_intact(run_id, states)


def test_a_deletion_that_died_after_the_manifest_is_called_one_and_clean_finishes_it(s3_experiment: str) -> None:
    run_id, states = log_run()
    first = find_checkpoint(run_id, 1)
    first.store.delete(layout.MANIFEST_FILE)  # retention's or gc's first step, then the process died
    del states[1]

    listed = CliRunner().invoke(main, ["verify", run_id])
    assert listed.exit_code == 0, listed.output
    # Was: "(a logged model whose save never committed)", of a checkpoint that had committed and loaded.
    assert f"LEFTOVER {label(first)} (a deletion that did not finish: its manifest is deleted" in listed.output
    assert f"1 leftover; `tracking verify --clean {run_id}` removes it, finishing the deletion" in listed.output
    assert "never committed" not in listed.output

    cleaned = CliRunner().invoke(main, ["verify", "--clean", run_id])
    assert cleaned.exit_code == 0 and "1 leftover removed" in cleaned.output, cleaned.output
    assert first.model_id not in run_models(run_id) and first.store.list_files("") == []
    assert_committed_intact(run_id, states)


def test_a_checkpoint_with_an_unreadable_manifest_is_not_a_leftover(s3_experiment: str) -> None:
    run_id, _ = log_run()
    first = find_checkpoint(run_id, 1)
    first.store.write_bytes(layout.MANIFEST_FILE, b"{not json")
    report = audit.verify(run_id)
    assert list(report.failures) == [f"checkpoint-epoch-0001 ({first.model_id})/{layout.MANIFEST_FILE}"]
    assert report.leftovers == []
    assert audit.clean_leftovers(run_id) == []
    assert first.store.list_files("") == [layout.CHECKPOINT_FILE, layout.MANIFEST_FILE]
    assert first.model_id in run_models(run_id)


def test_cli_verify_lists_leftovers_exits_0_and_clean_removes_them(s3_experiment: str, mocked_s3: Any) -> None:
    run_id, states = log_run()
    upload, orphan = kill_mid_save(mocked_s3, run_id)

    result = CliRunner().invoke(main, ["verify", run_id])
    assert result.exit_code == 0, result.output
    assert f"LEFTOVER {label(orphan)}" in result.stdout and f"LEFTOVER {label(upload)}/" in result.stdout
    assert "2 files intact" in result.stdout
    assert f"3 leftovers; `tracking verify --clean {run_id}` removes them" in result.stdout

    cleaned = CliRunner().invoke(main, ["verify", "--clean", run_id])
    assert cleaned.exit_code == 0, cleaned.output
    assert f"REMOVED {label(orphan)}" in cleaned.stdout and f"REMOVED {label(upload)}/" in cleaned.stdout
    assert "LEFTOVER" not in cleaned.stdout and "2 files intact" in cleaned.stdout
    assert_committed_intact(run_id, states)


def test_clean_refuses_a_running_run_unless_forced(s3_experiment: str, mocked_s3: Any) -> None:
    run_id, states = log_run(end=False)
    try:
        kill_mid_save(mocked_s3, run_id)
        refused = CliRunner().invoke(main, ["verify", "--clean", run_id])
        assert refused.exit_code == 1
        assert "still RUNNING" in refused.stderr and "--force" in refused.stderr
        with pytest.raises(TrackingError, match="still RUNNING"):
            audit.clean_leftovers(run_id, running=False)
        assert len(audit.verify(run_id).leftovers) == 3  # nothing was removed

        forced = CliRunner().invoke(main, ["verify", "--clean", "--force", run_id])
        assert forced.exit_code == 0, forced.output
        assert forced.stdout.count("REMOVED ") == 3
    finally:
        mlflow.end_run()
    assert_committed_intact(run_id, states)


def test_force_without_clean_is_a_usage_error(s3_experiment: str) -> None:
    run_id, _ = log_run()
    assert CliRunner().invoke(main, ["verify", "--force", run_id]).exit_code == 2


@pytest.mark.parametrize("checkpoint", ["bogus", "-1", "1.5", "", "latest2"])
def test_show_rejects_a_bogus_checkpoint_with_exit_2(checkpoint: str) -> None:
    result = CliRunner().invoke(main, ["show", "0" * 32, "--checkpoint", checkpoint])
    assert result.exit_code == 2, result.output
    assert "latest, best or an epoch number" in result.stderr


def test_show_accepts_an_epoch_number(s3_experiment: str) -> None:
    run_id, _ = log_run()
    result = CliRunner().invoke(main, ["show", run_id, "--checkpoint", "1"])
    assert result.exit_code == 0, result.output
    assert '"epoch": 1' in result.stdout
