"""``tracking.testing`` in a user's suite that enables only that plugin.

README's example passes; training code run as a child process (one, or a torchrun job's ranks) logs to
``tracking_s3_server``; a bucket name AWS refuses fails the fixtures' setup; a run a failed test left open
ends FAILED, a passed one's FINISHED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.user_suite import ROOT, run_user_suite


def _readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("### Testing your own training code", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    return block


def test_readme_example_passes_in_a_suite_with_only_the_plugin(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tracking.testing"]\n')
    (tmp_path / "test_training.py").write_text(_readme_example())
    # A user's environment may point at a real server and S3: the fixtures must not go there.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    env.update({"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "real-looking"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


# ------------------------------------------------------------ training code in a child process

TRAIN_IN_A_CHILD = """
import sys

import mlflow
import torch
from torch import nn

import tracking

torch.manual_seed(7)
model = nn.Linear(4, 2)
with mlflow.start_run() as run:  # the experiment tracking_experiment made active, in the store it made
    tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=3)
torch.save(model.state_dict(), sys.argv[1])
print(run.info.run_id)
"""


def test_training_code_in_a_child_process_logs_where_the_test_loads_it(
    tracking_s3_server: str, tracking_experiment: str, tmp_path: Path
) -> None:
    import boto3
    import mlflow
    import torch
    from torch import nn

    import tracking

    weights = tmp_path / "weights.pt"
    child = subprocess.run(
        [sys.executable, "-c", TRAIN_IN_A_CHILD, str(weights)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    run_id = child.stdout.split()[-1]

    assert mlflow.get_run(run_id).info.experiment_id == tracking_experiment
    loaded = tracking.load(run_id, model=nn.Linear(4, 2))
    assert loaded.epoch == 3
    assert torch.equal(loaded.model.weight, torch.load(weights, weights_only=True)["weight"])
    # The bytes are on the served moto, where a plain boto3 client of the test finds them too.
    assert boto3.client("s3").list_objects_v2(Bucket=tracking_s3_server)["KeyCount"] > 0


TRAIN_UNDER_TORCHRUN = """
import sys

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import tracking

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(7)
model = nn.Linear(4, 2)
if rank == 0:
    torch.save(model.state_dict(), sys.argv[1])
    run = mlflow.start_run()  # rank 0 alone talks to MLflow
fully_shard(model)
tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=3)  # every rank writes its shards
dist.destroy_process_group()
if rank == 0:
    mlflow.end_run()
    print(run.info.run_id)
"""


@pytest.mark.slow  # a torchrun job; the one-process child above is in make test
def test_training_code_under_torchrun_logs_every_ranks_shards_where_the_test_loads_them(
    tracking_s3_server: str, tracking_experiment: str, tmp_path: Path
) -> None:
    import mlflow
    import torch
    from torch import nn

    import tracking

    script, weights = tmp_path / "train.py", tmp_path / "weights.pt"
    script.write_text(TRAIN_UNDER_TORCHRUN)
    torchrun = Path(sys.executable).parent / "torchrun"
    job = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(weights)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    run_id = job.stdout.split()[-1]

    assert mlflow.get_run(run_id).info.experiment_id == tracking_experiment
    found = tracking.find_checkpoint(run_id, 3)
    assert found.manifest.kind == "sharded_checkpoint"
    shards = sorted(name for name in found.manifest.files if name.startswith("shard-"))
    assert shards == ["shard-00000.distcp", "shard-00001.distcp"]
    loaded = tracking.load(run_id, model=nn.Linear(4, 2))
    assert loaded.epoch == 3
    assert torch.equal(loaded.model.weight, torch.load(weights, weights_only=True)["weight"])


# ------------------------------------------------------------ a user's suite: bucket names, runs left open

BUCKET_NAMES = """
import pytest


@pytest.fixture(params=["My_Bucket", "ab", "a..b", "192.168.0.1"])
def tracking_s3_bucket(request) -> str:
    return request.param


def test_in_a_bucket_named(tracking_s3: str) -> None:
    pass


def test_in_a_served_bucket_named(tracking_s3_server: str) -> None:
    pass
"""

RUNS_LEFT_OPEN = """
import mlflow
import pytest
from mlflow import MlflowClient

left_open = {}


def test_fails_with_its_run_open(tracking_store: str) -> None:
    left_open["failed"] = (tracking_store, mlflow.start_run().info.run_id)
    assert False, "the training code under test failed"


def test_passes_with_its_run_open(tracking_experiment: str, tracking_store: str) -> None:
    left_open["passed"] = (tracking_store, mlflow.start_run().info.run_id)


@pytest.mark.parametrize(("test", "status"), [("failed", "FAILED"), ("passed", "FINISHED")])
def test_then_the_run_ended(test: str, status: str) -> None:
    store, run_id = left_open[test]
    assert MlflowClient(store).get_run(run_id).info.status == status
"""


BOTH_S3 = """
def test_with_both_s3_fixtures(tracking_s3: str, tracking_s3_server: str) -> None:
    pass
"""

# mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; a test after it, fixtures or not, must not inherit it.
EXPERIMENT_SET = """
import os


def test_sets_an_experiment(tracking_experiment: str) -> None:
    assert os.environ["MLFLOW_EXPERIMENT_ID"] == tracking_experiment


def test_then_none_is_exported() -> None:
    assert not os.environ.get("MLFLOW_EXPERIMENT_ID")
"""


@pytest.fixture(scope="module")
def user_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each test's outcome in a child pytest whose only plugin is tracking.testing: "passed", or its problem."""
    files = {"test_bucket_names.py": BUCKET_NAMES, "test_runs_left_open.py": RUNS_LEFT_OPEN, "test_both_s3.py": BOTH_S3}
    files["test_experiment_set.py"] = EXPERIMENT_SET
    outcomes, _ = run_user_suite(tmp_path_factory.mktemp("user-suite"), files)
    return outcomes


@pytest.mark.parametrize("name", ["My_Bucket", "ab", "a..b", "192.168.0.1"])
@pytest.mark.parametrize("fixture", ["tracking_s3", "tracking_s3_server"])
def test_a_bucket_name_s3_refuses_fails_the_fixtures_setup(user_suite: dict[str, str], fixture: str, name: str) -> None:
    test = "test_in_a_served_bucket_named" if fixture == "tracking_s3_server" else "test_in_a_bucket_named"
    problem = user_suite[f"{test}[{name}]"]
    assert problem.startswith("error: failed on setup"), problem
    assert f"tracking_s3_bucket is {name!r}, a name real S3 refuses" in problem, problem
    assert "override the tracking_s3_bucket fixture" in problem, problem


def test_a_run_a_failing_test_left_open_ends_failed_and_a_passing_ones_finished(user_suite: dict[str, str]) -> None:
    assert user_suite["test_fails_with_its_run_open"].startswith("failure:")
    assert user_suite["test_passes_with_its_run_open"] == "passed"
    assert user_suite["test_then_the_run_ended[failed-FAILED]"] == "passed", user_suite
    assert user_suite["test_then_the_run_ended[passed-FINISHED]"] == "passed", user_suite


def test_asking_for_both_s3_fixtures_fails_the_setup_naming_them(user_suite: dict[str, str]) -> None:
    problem = user_suite["test_with_both_s3_fixtures"]
    assert problem.startswith("error: failed on setup"), problem
    assert "asks for both tracking_s3" in problem and "ask for one" in problem, problem


def test_an_experiment_a_test_set_is_not_exported_to_the_next(user_suite: dict[str, str]) -> None:
    assert user_suite["test_sets_an_experiment"] == "passed", user_suite
    assert user_suite["test_then_none_is_exported"] == "passed", user_suite
