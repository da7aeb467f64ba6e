"""Reads by every rank of a two-process gloo job against moto's S3 server, right after the ranks' own saves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.unit.ranks import run_ranks

pytestmark = pytest.mark.slow  # two processes each; make test-all runs them

RESTORE_AFTER_A_BACKGROUND_SAVE = """
import tracking

run_id = args[0]
tracking.log_checkpoint(model, optimizer, epoch=1, run_id=run_id)
with tracking.Checkpointer(run_id=run_id, async_save=True, keep_last=1) as checkpointer:
    checkpointer.save(model, optimizer, epoch=2)  # still uploading in the background
    loaded = tracking.restore(run_id, model, optimizer)
    say(f"restored epoch {loaded.epoch}")
dist.destroy_process_group()
"""


@pytest.fixture
def run_id(tracking_s3_server: str, tracking_store: str) -> str:
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("ranks", f"s3://{tracking_s3_server}/exp"))
    with mlflow.start_run() as run:
        return str(run.info.run_id)


def test_a_restore_right_after_a_background_save_waits_for_it_on_every_rank(run_id: str, tmp_path: Path) -> None:
    # Was: the job hung, the restore's collectives interleaved with the background save's on the same group.
    outputs = run_ranks(RESTORE_AFTER_A_BACKGROUND_SAVE, 2, tmp_path, run_id, timeout=90)
    assert [out.strip() for out in outputs] == ["rank 0: restored epoch 2", "rank 1: restored epoch 2"]
