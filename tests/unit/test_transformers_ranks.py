"""The Hugging Face Trainer integration under DDP: what one rank meets (a file it cannot read, an alias moved
under it) reaches every rank alike, so that no rank waits in a collective for good or resumes another checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest

import tracking
from pipelines import data
from tests.unit.ranks import run_ranks
from tests.unit.test_transformers import make_trainer
from tracking.integrations.transformers import TrackingCallback, checkpoint_folder
from tracking.parallel import distributed

UNREADABLE_RNG_STATE = """
import pathlib, types
import tracking
from tracking.integrations.transformers import TrackingCallback
from tracking.run import open_run

run_id, out = args
output_dir = pathlib.Path(out) / f"rank-{rank}"  # a disk of each rank's own, as on two machines
folder = output_dir / "checkpoint-4"
folder.mkdir(parents=True)
(folder / f"rng_state_{rank}.pth").write_bytes(b"rng")
callback = TrackingCallback(run_id=run_id, async_upload=False)
if rank == 0:
    callback._handle = open_run(run_id)  # what on_train_begin opens, on rank 0 alone
else:

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    pathlib.Path.read_bytes = unreadable
training = types.SimpleNamespace(output_dir=str(output_dir), process_index=rank)
state = types.SimpleNamespace(is_world_process_zero=rank == 0, global_step=4)
try:
    callback.on_save(training, state, None)
    say("saved")
except tracking.TrackingError as exc:
    say(f"raised {exc}")
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes
def test_a_rank_that_cannot_read_its_rng_state_at_a_save_makes_every_rank_raise_it(
    tracking_store: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    # Was: rank 1 raised PermissionError alone, and rank 0 waited in the save's gather until the job timed out.
    outputs = run_ranks(UNREADABLE_RNG_STATE, 2, tmp_path, run_id, str(tmp_path / "out"), timeout=90)
    said = [out.strip().split(": ", 1)[1] for out in outputs]
    assert said[0] == said[1], said  # the same error on every rank
    unread = tmp_path / "out" / "rank-1" / "checkpoint-4" / "rng_state_1.pth"
    assert said[0].startswith(f"raised run {run_id}: the save of step 4 is not logged: rank 1 cannot read"), said
    assert str(unread) in said[0] and "Permission denied" in said[0] and "checkpoint_folder" in said[0], said
    assert tracking.list_checkpoints(run_id) == []


def test_a_machine_whose_first_rank_downloads_after_the_alias_moved_resumes_rank_0s_checkpoint(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = data.load("digits")
    split = data.Split(full.x_train[:128], full.y_train[:128], full.x_val[:32], full.y_val[:32])
    with mlflow.start_run() as run:
        make_trainer(split, tmp_path / "first", [TrackingCallback(async_upload=False)], 2).train()
    run_id = run.info.run_id
    tracking.register(run_id, "digits", checkpoint=2, alias="champion")
    output = tmp_path / "out"

    def alias_moves_on_rank0(step: Any, **kwargs: Any) -> Any:
        done = step()
        shutil.rmtree(output)  # rank 0's disk is another machine's
        tracking.register(run_id, "digits", checkpoint=1, alias="champion")  # moved as rank 1 starts
        return done

    def raise_together(error: BaseException | None) -> None:
        if error is not None:
            raise error

    # Rank 1 of two, the first of a machine of its own, in this process: rank 0's part (on_rank0) is run here too.
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "raise_together", raise_together)
    monkeypatch.setattr(distributed, "on_rank0", alias_moves_on_rank0)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "local_rank", lambda: 0)
    folder = Path(checkpoint_folder("models:/digits@champion", output_dir=output))
    # Was checkpoint-4 (epoch 1, where the alias points now): rank 0 resumes epoch 2's, step 8.
    assert folder == output / "checkpoint-8"
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-8"]
