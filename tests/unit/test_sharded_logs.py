"""``log_state_dict`` and ``log_model`` of a sharded (FSDP2) model: refused, since each stores one process's file.

A process group of one process (gloo, in this process) is enough to shard a model as torchrun jobs do.
"""

from __future__ import annotations

import mlflow
import pytest
from torch.distributed.fsdp import fully_shard

import tracking
from pipelines.models import Model
from tracking import layout


@pytest.mark.parametrize("log", [tracking.log_state_dict, tracking.log_model])
def test_a_sharded_model_is_refused_by_the_one_file_logs_before_anything_is_stored(
    experiment: str, process_group: None, log: object
) -> None:
    # Its weights are DTensors, each rank's shards: one process's torch.save of them never loads.
    model = Model(6)
    fully_shard(model)
    with mlflow.start_run() as run, pytest.raises(ValueError) as refused:
        log(model)  # type: ignore[operator]
    message = str(refused.value)
    assert f"run {run.info.run_id}" in message and "sharded (FSDP2)" in message
    assert "tracking.log_checkpoint(model" in message and "tracking.load_model" in message
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id, layout.STATE_DICT_DIR) == []
    assert tracking.list_checkpoints(run.info.run_id) == []
