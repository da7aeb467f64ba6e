"""Training under torchrun (2 gloo processes on CPU) against the real local stack, both strategies.

The core claim, as for the single-process pipeline: a run whose torchrun job dies by ``kill -9``
of one rank in the middle of epoch 5's checkpoint, resumed to epoch 8 by a new launch, ends
bit-identical to a run of 8 epochs straight: weights, optimizer, scheduler and each rank's RNG
states. The rank killed is the one writing: rank 0 (DDP, which writes ``checkpoint.pt`` alone),
rank 1 (FSDP2, while streaming its own shard file). A 2-rank sharded checkpoint loads in one plain
process, and into 2 and 1 FSDP2 ranks; a DDP checkpoint restores into 2 FSDP2 ranks; a rank whose
upload fails makes every rank raise and leaves nothing committed. A save in mid-epoch
(``--checkpoint-every-steps``) resumes with ``--from-step`` as the straight run goes on, on every rank.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import DigitsMLP
from tests.unit.gan import GAN  # the model's code: the loader never imports a module a manifest names
from tracking import catalog, layout
from tracking.localstack import LocalStack
from tracking.parallel import dcp_index, sharded
from tracking.run import open_run
from tracking.storage import BufferReader

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
EXPERIMENT = "distributed"
# Where each strategy's epoch-5 checkpoint is cut: the file the rank that writes it is streaming.
KILL_AT = {"ddp": layout.CHECKPOINT_FILE, "fsdp": sharded.shard_file(1)}


@dataclass
class Launch:
    code: int
    out: str

    @property
    def run_id(self) -> str:
        found = re.search(r"MLflow run ([0-9a-f]{32})", self.out)
        assert found, f"no run ID in the output:\n{self.out[-3000:]}"
        return found.group(1)


@pytest.fixture(scope="module")
def stack(stack_sqlite: LocalStack) -> LocalStack:
    """The session's sqlite stack (tests/conftest.py), shared with the other tiers."""
    return stack_sqlite


@pytest.fixture(scope="module")
def env(stack: LocalStack) -> Iterator[dict[str, str]]:
    variables = {**stack.env(), "TRACKING_EXPERIMENT": EXPERIMENT}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        patch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", stack.tracking_uri)
        yield {**os.environ, **variables}


def torchrun(env: dict[str, str], ranks: int, *args: str, timeout: float = 300) -> Launch:
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", "-m", *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM, which torchrun passes on to its ranks: killed alone (as subprocess.run does), it leaves them
            # hung, and hanging is what some of these tests catch.
            job.terminate()
            out, err = job.communicate()
            pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s:\n{(out + err)[-3000:]}")
    return Launch(job.returncode, out + err)


def raw(run_id: str, epoch: int) -> dict[str, Any]:
    """The stored checkpoint dict with every rank's ``rank_state``, as written (full tensors)."""
    found = tracking.find_checkpoint(run_id, epoch)
    files = found.manifest.files
    if found.manifest.kind == "sharded_checkpoint":
        return sharded.read(found.store, files, found.label)
    data = found.store.read(layout.CHECKPOINT_FILE, files[layout.CHECKPOINT_FILE])
    state = torch.load(cast(BinaryIO, BufferReader(data)), weights_only=True)
    assert isinstance(state, dict)
    return state


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@dataclass
class Scenario:
    strategy: str
    reference: str  # 8 epochs straight
    killed: Launch  # one rank killed while writing epoch 5's checkpoint
    killed_epochs: list[int]
    killed_status: str
    resumed: Launch  # the next launch: --resume to 8


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def scenario(request: pytest.FixtureRequest, env: dict[str, str]) -> Scenario:
    strategy = request.param
    common = ("pipelines.digits", "--strategy", strategy, "--epochs", "8")
    reference = torchrun(env, 2, *common)
    assert reference.code == 0, reference.out[-3000:]
    killed = torchrun(env, 2, "tests.distributed.fault", "kill", KILL_AT[strategy], "5", *common)
    assert killed.code != 0, killed.out[-3000:]
    killed_epochs = [c.epoch or 0 for c in tracking.list_checkpoints(killed.run_id)]
    killed_status = MlflowClient().get_run(killed.run_id).info.status
    resumed = torchrun(env, 2, *common, "--resume", killed.run_id)
    assert resumed.code == 0, resumed.out[-3000:]
    return Scenario(strategy, reference.run_id, killed, killed_epochs, killed_status, resumed)


def test_a_killed_rank_leaves_epoch_4_as_the_latest_checkpoint(scenario: Scenario) -> None:
    assert max(scenario.killed_epochs) == 4 and 5 not in scenario.killed_epochs
    # The job died: the run was never ended as FINISHED (rank 0, left alone in a collective, may end it FAILED).
    assert scenario.killed_status in ("RUNNING", "FAILED")


def test_resume_after_a_kill_matches_the_uninterrupted_run_on_every_rank(scenario: Scenario) -> None:
    assert f"MLflow run {scenario.killed.run_id}" in scenario.resumed.out  # the same run, continued
    resumed, reference = raw(scenario.killed.run_id, 8), raw(scenario.reference, 8)
    assert_identical(resumed, reference)  # model, optimizer, scheduler, metrics and every rank's state
    ranks = reference[layout.RANK_STATE]  # a list by rank (DDP), a dict by rank (FSDP)
    assert len(ranks) == 2 and all("rng" in state for state in (ranks if isinstance(ranks, list) else ranks.values()))
    kind = tracking.find_checkpoint(scenario.reference, 8).manifest.kind
    assert kind == ("sharded_checkpoint" if scenario.strategy == "fsdp" else "checkpoint")
    if scenario.strategy == "fsdp":
        # Each rank's own file, byte for byte: its shards of the weights and of the optimizer state.
        mine = tracking.find_checkpoint(scenario.killed.run_id, 8).manifest.files
        theirs = tracking.find_checkpoint(scenario.reference, 8).manifest.files
        assert set(mine) == {sharded.shard_file(0), sharded.shard_file(1), dcp_index.METADATA_FILE}
        assert mine == theirs


@pytest.mark.parametrize("scenario", ["fsdp"], indirect=True)
def test_a_sharded_checkpoint_loads_in_one_plain_process(scenario: Scenario) -> None:
    loaded = tracking.load(scenario.reference, 8, mode="train")
    stored = raw(scenario.reference, 8)
    assert type(loaded.model) is DigitsMLP and loaded.epoch == 8
    assert_identical(dict(loaded.model.state_dict()), stored["model_state"])
    assert loaded.optimizer is not None and loaded.scheduler is not None
    assert_identical(loaded.optimizer.state_dict(), sharded.index_keyed(stored["optim_state"]))
    assert loaded.rank_state is not None and "rng" in loaded.rank_state  # rank 0's, in a plain process


@pytest.mark.parametrize("scenario", ["fsdp"], indirect=True)
@pytest.mark.parametrize("ranks", [2, 1])
def test_a_sharded_checkpoint_loads_into_fsdp_ranks(
    scenario: Scenario, env: dict[str, str], ranks: int, tmp_path: Path
) -> None:
    launch = torchrun(env, ranks, "tests.distributed.restore_check", scenario.reference, "8", str(tmp_path))
    assert launch.code == 0, launch.out[-3000:]
    stored = raw(scenario.reference, 8)
    for rank in range(ranks):
        got = torch.load(tmp_path / f"rank{rank}-of-{ranks}.pt", weights_only=True)
        assert got["epoch"] == 8
        assert_identical(got["model_state"], stored["model_state"])
        assert_identical(got["optim_state"], stored["optim_state"])
        assert_identical(got["rank_state"], stored[layout.RANK_STATE][str(rank)])


@pytest.mark.parametrize("scenario", ["ddp"], indirect=True)
def test_a_whole_model_checkpoint_restores_into_fsdp_ranks(
    scenario: Scenario, env: dict[str, str], tmp_path: Path
) -> None:
    # A run trained with DDP (or in one process) goes on with FSDP2 once the model outgrows a rank.
    launch = torchrun(env, 2, "tests.distributed.restore_check", scenario.reference, "8", str(tmp_path))
    assert launch.code == 0, launch.out[-3000:]
    stored = raw(scenario.reference, 8)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}-of-2.pt", weights_only=True)
        assert got["epoch"] == 8
        assert_identical(got["model_state"], stored["model_state"])
        assert_identical(sharded.index_keyed(got["optim_state"]), stored["optim_state"])
        assert_identical(got["rank_state"], stored[layout.RANK_STATE][rank])


@pytest.mark.parametrize(("strategy", "failing"), [("fsdp", sharded.shard_file(1)), ("ddp", layout.CHECKPOINT_FILE)])
def test_a_rank_that_fails_to_upload_makes_every_rank_raise(
    env: dict[str, str], strategy: str, failing: str, stack: LocalStack
) -> None:
    launch = torchrun(
        env, 2, "tests.distributed.fault", "fail", failing, "1", "pipelines.digits", "--strategy", strategy,
        "--epochs", "2",
    )  # fmt: skip
    assert launch.code != 0
    errors = [line for line in launch.out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, launch.out[-3000:]  # both ranks, the same error
    assert errors[0] == errors[1] and "injected" in errors[0]
    run_id = launch.run_id
    assert tracking.list_checkpoints(run_id) == []
    client = MlflowClient()
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert [str(m.status) for m in models] == ["FAILED"]
    leftover = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=_key(models[0].artifact_location))
    assert leftover.get("KeyCount", 0) == 0  # no shard of the failed save stays behind


def _key(artifact_location: str) -> str:
    return artifact_location.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/"


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_destroying_the_process_group_right_after_a_background_save_keeps_it(
    env: dict[str, str], strategy: str
) -> None:
    # PyTorch's examples end with destroy_process_group(); the saves still in the background must commit first.
    launch = torchrun(env, 2, "tests.distributed.async_exit", strategy, "3")
    assert launch.code == 0, launch.out[-3000:]
    assert [c.epoch for c in tracking.list_checkpoints(launch.run_id)] == [1, 2, 3]


def test_a_background_save_cut_off_by_the_process_groups_end_says_what_to_do(env: dict[str, str]) -> None:
    # Through a name bound before the first save, destroy_process_group cannot wait: a rank says why the save is lost
    # (the first rank to fail ends the job: the other may be stopped before it says so too).
    launch = torchrun(env, 2, "tests.distributed.async_exit", "fsdp", "3", "imported")
    assert launch.code != 0
    errors = [line for line in launch.out.splitlines() if line.startswith("error:")]
    assert errors, launch.out[-3000:]
    for error in errors:
        # The save before it is committed before the next one starts (on_busy="wait"): only epoch 3 was cut off.
        assert (
            "the checkpoint of epoch 3 was still saving in the background when the process group was destroyed" in error
        )
        assert "call tracking.wait_for_checkpoints()" in error


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_save_in_mid_epoch_resumes_as_the_straight_run_on_every_rank(env: dict[str, str], strategy: str) -> None:
    # 1,437 rows over 2 ranks in batches of 64: 12 steps an epoch on each rank. A save every 5 steps puts step 20
    # in mid-epoch 2 (its 8th batch): the child skips each rank's 7 batches taken and goes on with the 8th.
    common = ("pipelines.digits", "--strategy", strategy, "--epochs", "3")
    every = ("--checkpoint-every-steps", "5", "--keep-last", "all")
    straight = torchrun(env, 2, *common, *every)
    assert straight.code == 0, straight.out[-3000:]
    child = torchrun(env, 2, *common, "--resume", straight.run_id, "--from-step", "20", "--new-run")
    assert child.code == 0, child.out[-3000:]

    assert [c.step for c in tracking.list_checkpoints(straight.run_id)] == [5, 10, 15, 20, 25, 30, 35, 36]
    assert [c.step for c in tracking.list_checkpoints(child.run_id)] == [25, 30, 35, 36]
    assert_identical(raw(child.run_id, 36), raw(straight.run_id, 36))  # every rank's states too


def test_resuming_a_torchrun_run_in_one_process_says_how_to_launch_it(env: dict[str, str]) -> None:
    # Its checkpoints keep each rank's RNG and sampler state: one process cannot go on exactly, and must say so.
    trained = torchrun(env, 2, "pipelines.digits", "--strategy", "ddp", "--epochs", "1")
    assert trained.code == 0, trained.out[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.digits", "--resume", trained.run_id, "--epochs", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"run {trained.run_id}" in done.stderr and "saved by 2 ranks" in done.stderr
    assert "`torchrun --nproc-per-node 2 -m pipelines.digits --strategy ddp --resume" in done.stderr
    assert [c.epoch for c in tracking.list_checkpoints(trained.run_id)] == [1]  # untouched


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_keep_best_ranks_by_the_metrics_rank_0_saves_with(env: dict[str, str], strategy: str) -> None:
    # Rank 0 alone validates, as log_checkpoint allows: the other ranks have no metrics to pass.
    launch = torchrun(env, 2, "tests.distributed.lead_metrics", strategy)
    assert launch.code == 0, launch.out[-3000:]
    kept = {c.epoch: c.metrics for c in tracking.list_checkpoints(launch.run_id)}
    assert kept == {2: {"val_loss": 0.2}, 3: {"val_loss": 0.9}}  # the best and the last
    assert tracking.find_checkpoint(launch.run_id, "best").manifest.epoch == 2


def every_ranks_refusal(launch: Launch) -> str:
    """The one message both ranks of a job that exited cleanly printed as "rank N refused: ..."."""
    assert launch.code == 0, launch.out[-3000:]
    refusals = re.findall(r"rank (\d) refused: (.*)", launch.out)
    assert sorted(rank for rank, _ in refusals) == ["0", "1"], launch.out[-3000:]
    assert refusals[0][1] == refusals[1][1], refusals
    return str(refusals[0][1])


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_ranks_that_pass_different_epochs_to_one_save_all_raise_and_nothing_is_stored(
    env: dict[str, str], strategy: str
) -> None:
    launch = torchrun(env, 2, "tests.distributed.split_keys", strategy)
    message = every_ranks_refusal(launch)
    assert message.startswith(f"run {launch.run_id}: the ranks saved one checkpoint")
    assert "rank 0: epoch=1, step=None; rank 1: epoch=2, step=None" in message and "Nothing was stored" in message
    assert [c.epoch for c in tracking.list_checkpoints(launch.run_id)] == [5]
    every = catalog.search(open_run(launch.run_id), status=None)  # no logged model left of the refused save
    assert [(c.epoch, c.status) for c in every] == [(5, catalog.READY)]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_checkpointer_whose_ranks_count_epochs_apart_fails_every_rank_at_its_first_call(
    env: dict[str, str], strategy: str
) -> None:
    # Rank 1 resumed one epoch ahead: every_n_epochs=2 finds the save due on one rank only. Without the first call's
    # check, that rank waits in the commit while the other trains on, and the job hangs.
    launch = torchrun(env, 2, "tests.distributed.ranks_apart", strategy, timeout=120)
    message = every_ranks_refusal(launch)
    assert message.startswith(f"run {launch.run_id}: the ranks called Checkpointer.save")
    assert "rank 0: epoch=0, step=None; rank 1: epoch=1, step=None" in message and "Nothing was stored" in message
    assert "Pass every rank the same epoch= and step=" in message
    assert catalog.search(open_run(launch.run_id), status=None) == []  # not even a failed logged model


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_rank_0_waiting_for_the_other_ranks_at_a_save_says_why_they_may_never_come(
    env: dict[str, str], strategy: str
) -> None:
    launch = torchrun(env, 2, "tests.distributed.late_rank", strategy)
    assert launch.code == 0, launch.out[-3000:]
    waited = [line for line in launch.out.splitlines() if "has waited" in line]
    assert len(waited) == 1, launch.out[-3000:]  # once, at the first save; not at the second, reached together
    assert waited[0].startswith("rank 0 has waited 1 s for the other 1 rank(s) to reach the save of epoch 1: ")
    assert "under `if rank == 0:`" in waited[0] and "Make the call on every rank" in waited[0]
    assert [c.epoch for c in tracking.list_checkpoints(launch.run_id)] == [1, 2]  # the late rank's save went on


def test_a_rank_alone_in_a_due_save_says_what_it_waits_for(env: dict[str, str], tmp_path: Path) -> None:
    # Step counters that drift apart after the Checkpointer's first call: the save is due on rank 1 only, which waits
    # in its first collective while rank 0 trains on. Rank 0 makes the same save once rank 1 has said so.
    launch = torchrun(env, 2, "tests.distributed.drifted_ranks", str(tmp_path), timeout=120)
    assert launch.code == 0, launch.out[-3000:]
    assert "rank 0 saw rank 1's warning: True" in launch.out, launch.out[-3000:]
    waited = [line for line in launch.out.splitlines() if "has waited" in line]
    assert len(waited) == 1, launch.out[-3000:]  # once, on the rank that waited
    assert waited[0].startswith("rank 1 has waited 1 s for the other 1 rank(s) to reach the save of epoch 0, step 2: ")
    assert "under `if rank == 0:`" in waited[0] and "Checkpointer(every_n_steps=...)" in waited[0]
    assert "Still waiting" in waited[0]
    assert [c.step for c in tracking.list_checkpoints(launch.run_id)] == [2]  # the save went on once rank 0 came


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_optimizers_by_name_are_logged_and_restored_on_every_rank(
    env: dict[str, str], strategy: str, tmp_path: Path
) -> None:
    launch = torchrun(env, 2, "tests.distributed.two_optimizers", strategy, str(tmp_path))
    assert launch.code == 0, launch.out[-3000:]
    for rank in (0, 1):
        line = f"rank {rank} restored ['discriminator', 'generator']: equal before False, after True"
        assert line in launch.out, launch.out[-3000:]
    found = tracking.find_checkpoint(launch.run_id)
    assert found.manifest.kind == ("sharded_checkpoint" if strategy == "fsdp" else "checkpoint")
    assert found.manifest.optimizers is not None and sorted(found.manifest.optimizers) == ["discriminator", "generator"]
    # Rebuilt in this one plain process from the run alone: what every rank logged, each optimizer by name.
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    loaded = tracking.load(launch.run_id, mode="train")
    assert type(loaded.model) is GAN
    assert (loaded.optimizer, loaded.scheduler) == (None, None)
    assert_identical(dict(loaded.model.state_dict()), saved["model_state"])
    for name, optimizer in loaded.optimizers.items():
        by_name = sharded.name_keyed(optimizer.state_dict(), loaded.model, optimizer)
        assert_identical(by_name["state"], saved["optim_state"][name]["state"], name)
        assert_identical(loaded.schedulers[name].state_dict(), saved["scheduler_state"][name], name)
