"""What dead saves leave behind: reported by verify, removed by clean_leftovers, committed data untouched."""

from __future__ import annotations

from typing import Any

import mlflow
import pytest
import torch
from click.testing import CliRunner

import tracking
from pipelines.models import Model
from tracking import audit, layout
from tracking.cli import main
from tracking.errors import TrackingError
from tracking.run import open_run
from tracking.uri import parse_s3_uri

UPLOAD = f"{layout.checkpoint_dir(4)}/{layout.CHECKPOINT_FILE}"  # killed mid-upload
ORPHAN = f"{layout.checkpoint_dir(5)}/{layout.CHECKPOINT_FILE}"  # killed before its manifest
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


def kill_mid_save(s3: Any, run_id: str) -> None:
    """What two dead saves leave: a multipart upload with one part, and data without its manifest."""
    root = parse_s3_uri(mlflow.get_run(run_id).info.artifact_uri)
    key = root.join(UPLOAD).key
    upload = s3.create_multipart_upload(Bucket=root.bucket, Key=key)
    s3.upload_part(Bucket=root.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    s3.put_object(Bucket=root.bucket, Key=root.join(ORPHAN).key, Body=b"half a checkpoint")


def assert_committed_intact(run_id: str, states: dict[int, dict[str, torch.Tensor]]) -> None:
    assert layout.committed_epochs(open_run(run_id).store) == sorted(states)
    for epoch, state in states.items():
        loaded = tracking.load(run_id, epoch).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), f"epoch {epoch} changed"
    report = audit.verify(run_id)
    assert report and not report.failures and not report.leftovers


def test_verify_reports_leftovers_and_clean_removes_only_them(s3_experiment: str, mocked_s3: Any) -> None:
    run_id, states = log_run()
    kill_mid_save(mocked_s3, run_id)

    report = audit.verify(run_id)
    assert not report.failures
    assert sorted(report.leftovers, key=str) == [
        audit.Leftover(UPLOAD, audit.UNFINISHED_UPLOAD),
        audit.Leftover(ORPHAN, audit.UNCOMMITTED),
    ]
    assert all(layout.epoch_of(path) in states for path in report)  # leftovers are not in the file report

    removed = audit.clean_leftovers(run_id)
    assert sorted(removed) == sorted([f"{ORPHAN} ({audit.UNCOMMITTED})", f"{UPLOAD} ({audit.UNFINISHED_UPLOAD})"])
    assert (
        mocked_s3.list_multipart_uploads(Bucket=parse_s3_uri(open_run(run_id).store.artifact_uri).bucket).get(
            "Uploads", []
        )
        == []
    )
    assert ORPHAN not in {
        f"{layout.CHECKPOINTS_DIR}/{p}" for p in open_run(run_id).store.list_files(layout.CHECKPOINTS_DIR)
    }
    assert_committed_intact(run_id, states)
    assert audit.clean_leftovers(run_id) == []


def test_data_without_manifest_on_the_mlflow_path(experiment: str) -> None:
    """Both stores: a checkpoint whose manifest was retracted, and a state dict never committed."""
    run_id, states = log_run()
    store = open_run(run_id).store
    store.write_bytes(ORPHAN, b"half a checkpoint")
    store.write_bytes(RETRACTED_STATE, b"half a state dict")
    assert [str(x) for x in audit.verify(run_id).leftovers] == [
        f"{RETRACTED_STATE} ({audit.UNCOMMITTED})",
        f"{ORPHAN} ({audit.UNCOMMITTED})",
    ]
    assert len(audit.clean_leftovers(run_id)) == 2
    assert_committed_intact(run_id, states)


def test_a_folder_with_an_unreadable_manifest_is_not_a_leftover(s3_experiment: str) -> None:
    run_id, _ = log_run()
    store = open_run(run_id).store
    store.write_bytes(layout.manifest_path(layout.checkpoint_dir(1)), b"{not json")
    report = audit.verify(run_id)
    assert list(report.failures) == [layout.manifest_path(layout.checkpoint_dir(1))]
    assert report.leftovers == []
    assert audit.clean_leftovers(run_id) == []
    assert store.list_files(layout.checkpoint_dir(1)) == [layout.CHECKPOINT_FILE, layout.MANIFEST_FILE]


def test_cli_verify_lists_leftovers_exits_0_and_clean_removes_them(s3_experiment: str, mocked_s3: Any) -> None:
    run_id, states = log_run()
    kill_mid_save(mocked_s3, run_id)

    result = CliRunner().invoke(main, ["verify", run_id])
    assert result.exit_code == 0, result.output
    assert f"LEFTOVER {ORPHAN}" in result.stdout and f"LEFTOVER {UPLOAD}" in result.stdout
    assert "2 files intact" in result.stdout
    assert f"2 leftovers; `tracking verify --clean {run_id}` removes them" in result.stdout

    cleaned = CliRunner().invoke(main, ["verify", "--clean", run_id])
    assert cleaned.exit_code == 0, cleaned.output
    assert f"REMOVED {ORPHAN}" in cleaned.stdout and f"REMOVED {UPLOAD}" in cleaned.stdout
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
        assert len(audit.verify(run_id).leftovers) == 2  # nothing was removed

        forced = CliRunner().invoke(main, ["verify", "--clean", "--force", run_id])
        assert forced.exit_code == 0, forced.output
        assert forced.stdout.count("REMOVED ") == 2
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
