"""The Lightning benchmark's steps, with tiny sizes (``--smoke``) on moto S3: every figure is produced."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

import tracking
from benchmarks import lightning as bench


def test_smoke_produces_every_figure(s3_experiment: str, tmp_path: Path) -> None:
    output = tmp_path / "lightning.json"
    assert bench.main(["--smoke", "--experiment", "unit-s3", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    overhead, background = results["overhead"], results["background"]
    assert overhead["saves"] == 3 and overhead["checkpoint_bytes"] > 0
    assert overhead["mirrored_save_median_s"] > 0 and overhead["lightning_save_median_s"] > 0
    assert background["background_upload_median_s"] > 0 and background["bytes"] >= 4 * 2**20
    # What was measured was committed: the mirrored saves are checkpoints of their runs.
    assert [c.epoch for c in tracking.list_checkpoints(overhead["run_id"])] == [0, 1, 2, 3]
    assert [c.epoch for c in tracking.list_checkpoints(background["run_id"])] == [0]
    assert mlflow.get_run(background["run_id"]).info.status == "FINISHED"
