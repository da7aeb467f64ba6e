"""Sharded (FSDP2) checkpoints saved by the ranks of a two-process gloo job against moto's S3 server.

Every rank writes its own shard to the store, so what each rank is given (its config) and what each meets
(a failure before the shards' writes) must lead every rank to the same place: the same store, the same error;
and a restore right after the ranks' own background saves must restore what they saved.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from torch import nn

import tracking
from tests.unit.ranks import run_ranks
from tracking.config import TrackingConfig

pytestmark = pytest.mark.slow  # two processes each; make test-all runs them

GIVEN_CONFIG = """
import tracking
from tracking.config import TrackingConfig

run_id, endpoint = args
# The store's endpoint is given as an argument; the environment names another, where nothing answers.
config = TrackingConfig.from_env(s3_endpoint_url=endpoint)
tracking.log_checkpoint(model, optimizer, epoch=1, run_id=run_id, config=config)
with tracking.Checkpointer(keep_last=1, run_id=run_id, config=config) as checkpointer:
    checkpointer.save(model, optimizer, epoch=2)
say("saved")
dist.destroy_process_group()
"""


@pytest.fixture
def run_id(tracking_s3_server: str, tracking_store: str) -> str:
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("ranks", f"s3://{tracking_s3_server}/exp"))
    with mlflow.start_run() as run:
        return str(run.info.run_id)


def test_every_rank_stores_its_shard_where_the_config_given_says(run_id: str, tmp_path: Path) -> None:
    endpoint = TrackingConfig.from_env().s3_endpoint_url
    assert endpoint is not None
    # Was: ranks other than 0 read the environment's endpoint, and the save failed there ("cannot reach S3").
    outputs = run_ranks(
        GIVEN_CONFIG,
        2,
        tmp_path,
        run_id,
        endpoint,
        env={"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "", "AWS_MAX_ATTEMPTS": "1"},
    )
    assert [out.strip() for out in outputs] == ["rank 0: saved", "rank 1: saved"]
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [2]  # keep_last=1: epoch 1 deleted
    loaded = tracking.load(run_id, model=small_model)
    assert loaded.epoch == 2


def small_model() -> nn.Module:
    """The model of the ranks' script (tests.unit.ranks), unsharded."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


ONE_RANK_FAILS = """
import tracking
from tracking.errors import StorageError
from tracking.parallel import sharded
from tracking.storage.s3 import S3Store

run_id, failing, failing_rank = args[0], args[1], int(args[2])
tracking.log_checkpoint(model, optimizer, epoch=1, run_id=run_id)


def fail(*args, **kwargs):
    raise StorageError(f"injected: rank {rank} fails {failing}")


if rank == failing_rank:
    if failing == "open":
        sharded.open_store = fail  # before any shard is written
    else:
        S3Store.write = fail  # its shard's upload
try:
    tracking.log_checkpoint(model, optimizer, epoch=2, run_id=run_id)
    say("saved")
except tracking.TrackingError as exc:
    say(f"raised {exc}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize(("failing", "failing_rank"), [("open", 0), ("shard", 1)])
def test_a_rank_that_fails_makes_every_rank_raise_its_error_naming_it(
    run_id: str, tmp_path: Path, failing: str, failing_rank: int
) -> None:
    # Was ("open", 0): rank 1 wrote its shard alone, in collectives rank 0 never joined: the job hung.
    # Was ("shard", 1): the error said rank 0, which had stored its shard.
    outputs = run_ranks(ONE_RANK_FAILS, 2, tmp_path, run_id, failing, str(failing_rank), timeout=90)
    said = [out.strip().split(": ", 1)[1] for out in outputs]
    assert said[0] == said[1], said  # the same error on every rank
    assert said[0].startswith(f"raised rank {failing_rank}: ") and f"injected: rank {failing_rank}" in said[0], said
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]
    assert tracking.load(run_id, model=small_model).epoch == 1  # the previous checkpoint is still the latest


ONE_RANK_CANNOT_READ = """
import boto3
import tracking

run_id = args[0]
logged = tracking.log_checkpoint(model, optimizer, epoch=1, run_id=run_id)
if rank == 1:
    # Its own shard, which it alone reads back: the same size, other bytes.
    bucket, key = logged.artifact_uri.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", region_name="us-east-1")
    body = s3.get_object(Bucket=bucket, Key=f"{key}/shard-00001.distcp")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"{key}/shard-00001.distcp", Body=bytes(255 - b for b in body))
dist.barrier()
try:
    tracking.restore(run_id, model, optimizer)
    say("restored")
except tracking.TrackingError as exc:
    say(f"raised {type(exc).__name__}: {exc}")
dist.destroy_process_group()
"""


def test_a_rank_that_cannot_read_its_part_makes_every_rank_raise_its_error(run_id: str, tmp_path: Path) -> None:
    # Was: rank 0 restored and went on to train, into collectives rank 1, which had raised, never reached.
    outputs = run_ranks(ONE_RANK_CANNOT_READ, 2, tmp_path, run_id, timeout=90)
    said = [out.strip().split(": ", 1)[1] for out in outputs]
    assert said[0] == said[1], said
    assert said[0].startswith("raised IntegrityError: ") and "shard-00001.distcp" in said[0], said


RANK_0_FAILS_BEFORE_THE_COMMIT = """
import tracking

strategy, run_id, how = args
if strategy == "ddp":
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
try:
    if how == "log_checkpoint":
        tracking.log_checkpoint(model, epoch=1, run_id=run_id)
    elif how == "Checkpointer":
        tracking.Checkpointer(keep_best=1, run_id=run_id).save(model, epoch=1, metrics={"val_loss": 0.5})
    else:
        checkpointer = tracking.Checkpointer(keep_best=1, run_id=run_id)
        checkpointer.save(model, epoch=1, metrics={"val_loss": 0.5} if rank == 0 else None)
        # Rank 0 validates, and forgot the metric keep_best ranks by; the other ranks pass none.
        checkpointer.save(model, epoch=2, metrics={"loss": 0.4} if rank == 0 else None)
    say("saved")
except (tracking.TrackingError, ValueError) as exc:
    say(f"raised {type(exc).__name__}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("how", ["log_checkpoint", "Checkpointer"])
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_run_rank_0_cannot_open_makes_every_rank_raise(
    tracking_store: str, tmp_path: Path, strategy: str, how: str
) -> None:
    # Was (log_checkpoint): rank 0 raised NotFoundError alone; rank 1 waited in the commit for it, for good.
    outputs = run_ranks(RANK_0_FAILS_BEFORE_THE_COMMIT, 2, tmp_path, strategy, "0" * 32, how, timeout=90)
    assert [out.strip() for out in outputs] == ["rank 0: raised NotFoundError", "rank 1: raised NotFoundError"]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_save_rank_0_refuses_makes_every_rank_raise(run_id: str, tmp_path: Path, strategy: str) -> None:
    # Was: rank 0 raised ValueError alone; rank 1 waited in the commit for it, for good.
    outputs = run_ranks(RANK_0_FAILS_BEFORE_THE_COMMIT, 2, tmp_path, strategy, run_id, "no_monitor", timeout=90)
    assert [out.strip() for out in outputs] == ["rank 0: raised ValueError", "rank 1: raised ValueError"]
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1]


SAVE_THEN_RESTORE = """
import tracking
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

run_id, action, saved = args
full = StateDictOptions(full_state_dict=True)


def whole():
    model_state = get_model_state_dict(model, options=full)
    return {"model": model_state, "optim": get_optimizer_state_dict(model, optimizer, options=full)}


if action == "save":
    tracking.log_checkpoint(model, optimizer, epoch=1, run_id=run_id)
    state = whole()
    if rank == 0:
        torch.save(state, saved)
else:
    for _ in range(3):  # away from the saved state
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = whole()
    tracking.restore(run_id, model, optimizer)
    after, expected = whole(), torch.load(saved, weights_only=True)
    differed = not torch.equal(before["model"]["0.weight"], expected["model"]["0.weight"])
    same = all(torch.equal(after["model"][k], v) for k, v in expected["model"].items())
    moments = [s["exp_avg"] for s in after["optim"]["state"].values()]
    same_optim = all(
        torch.equal(m, e["exp_avg"]) for m, e in zip(moments, expected["optim"]["state"].values(), strict=True)
    )
    say(f"differed {differed}, restored {same and same_optim}")
dist.destroy_process_group()
"""


def test_a_sharded_checkpoint_of_two_ranks_restores_into_three(run_id: str, tmp_path: Path) -> None:
    saved = str(tmp_path / "saved.pt")
    run_ranks(SAVE_THEN_RESTORE, 2, tmp_path, run_id, "save", saved)
    outputs = run_ranks(SAVE_THEN_RESTORE, 3, tmp_path, run_id, "restore", saved)
    assert [out.strip() for out in outputs] == [f"rank {r}: differed True, restored True" for r in range(3)]


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


def test_a_restore_right_after_a_background_save_waits_for_it_on_every_rank(run_id: str, tmp_path: Path) -> None:
    # Was: the job hung, the restore's collectives interleaved with the background save's on the same group.
    outputs = run_ranks(RESTORE_AFTER_A_BACKGROUND_SAVE, 2, tmp_path, run_id, timeout=90)
    assert [out.strip() for out in outputs] == ["rank 0: restored epoch 2", "rank 1: restored epoch 2"]


TWO_SAVERS_IN_THE_BACKGROUND = """
import tracking

run_id = args[0]
checkpointer = tracking.Checkpointer(run_id=run_id, async_save=True)
for epoch in (1, 3):  # two savers, each still committing as the other's save is handed over
    tracking.log_checkpoint(model, optimizer, epoch=epoch, run_id=run_id, blocking=False)
    checkpointer.save(model, optimizer, epoch=epoch + 1)
checkpointer.close()
tracking.wait_for_checkpoints()
say("saved")
dist.destroy_process_group()
"""


def test_two_savers_saving_in_the_background_at_once_commit_every_checkpoint_on_every_rank(
    run_id: str, tmp_path: Path
) -> None:
    # Was: each saver committed on its own thread, their collectives interleaved in another order on each rank, and
    # the job hung.
    outputs = run_ranks(TWO_SAVERS_IN_THE_BACKGROUND, 2, tmp_path, run_id, timeout=90)
    assert [out.strip() for out in outputs] == ["rank 0: saved", "rank 1: saved"]
    assert [c.epoch for c in tracking.list_checkpoints(run_id)] == [1, 2, 3, 4]
    for epoch in (1, 2, 3, 4):
        assert tracking.load(run_id, epoch, model=small_model).epoch == epoch
