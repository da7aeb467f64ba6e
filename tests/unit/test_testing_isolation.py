"""``tracking.testing`` isolates each test of a user's suite from the shell and from the tests before it.

One child pytest session, with ``tracking.testing`` as its only plugin, runs a user's tests in a shell that
points everywhere else: MLflow's tracking and registry URIs, an experiment and run ID, S3 endpoints and an
AWS config file whose default profile names an endpoint, all at a local server that records every request
it gets. None may reach it, and no test may see what an earlier one left: an active experiment, a registry
URI, a background checkpoint save still running or one that failed.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from tests.unit.user_suite import run_user_suite

USER_SUITE = """
import threading

import boto3
import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

import tracking
from tracking.cli import main
from tracking.layout import TAG_LATEST
from tracking.storage.s3 import S3Store


def log_checkpoint(blocking: bool = True) -> None:
    model = nn.Linear(4, 2)
    tracking.log_checkpoint(model, torch.optim.SGD(model.parameters()), epoch=1, blocking=blocking)


def test_registers_loads_and_lists_in_the_fixtures(tracking_experiment: str) -> None:
    with mlflow.start_run() as run:
        log_checkpoint()
    tracking.register(run.info.run_id, "mine", checkpoint="latest", alias="champion")
    assert tracking.load("models:/mine@champion", model=nn.Linear(4, 2)).epoch == 1
    listed = CliRunner().invoke(main, ["runs", "--json"])
    assert listed.exit_code == 0 and run.info.run_id in listed.output, listed.output


def test_keeps_artifacts_in_its_tmp_path(tracking_store: str, tmp_path) -> None:
    mlflow.set_experiment("made-by-the-test")  # with no artifact location of its own
    with mlflow.start_run() as run:
        mlflow.log_text("x", "a.txt")
    with mlflow.start_run(experiment_id="0") as default:
        mlflow.log_text("x", "a.txt")
    for made in (run, default):
        assert made.info.artifact_uri.removeprefix("file://").startswith(str(tmp_path)), made.info.artifact_uri


def test_sets_experiment_and_registry_of_its_own(tracking_experiment: str) -> None:
    mlflow.set_experiment("mine")
    mlflow.set_registry_uri("sqlite:///elsewhere.db")


def test_then_runs_go_to_its_stores_default_experiment(tracking_store: str) -> None:
    with mlflow.start_run() as run:
        mlflow.log_param("a", 1)
    assert run.info.experiment_id == "0"
    assert mlflow.get_registry_uri() == tracking_store


left_running = {}


def test_leaves_a_slow_background_save_running(tracking_experiment: str, tracking_store: str, monkeypatch) -> None:
    write = S3Store.write

    def slow_write(self, *args, **kwargs):
        threading.Event().wait(1.0)  # an upload still under way when the test returns
        return write(self, *args, **kwargs)

    monkeypatch.setattr(S3Store, "write", slow_write)
    with mlflow.start_run() as run:
        log_checkpoint(blocking=False)
    left_running.update(run_id=run.info.run_id, store=tracking_store)


def test_then_that_save_was_committed_in_its_own_test(tracking_s3: str) -> None:
    tags = MlflowClient(left_running["store"]).get_run(left_running["run_id"]).data.tags
    assert TAG_LATEST in tags, "the save of the test before was still running when it ended"
    assert boto3.client("s3").list_objects_v2(Bucket=tracking_s3)["KeyCount"] == 0


def test_leaves_a_failing_background_save(tracking_experiment: str, tracking_s3: str) -> None:
    with mlflow.start_run():
        boto3.client("s3").delete_bucket(Bucket=tracking_s3)
        log_checkpoint(blocking=False)


def test_then_saves_of_its_own_succeed(tracking_experiment: str) -> None:
    with mlflow.start_run():
        log_checkpoint()

"""


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A server standing for the user's real ones: it records each request and answers 500."""

    requests: ClassVar[list[str]] = []

    def _record(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = _record

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def user_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], list[str], str]]:
    """Each child test's outcome ("passed", or its failures and errors), the requests the shell's servers got."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    elsewhere = f"http://127.0.0.1:{server.server_address[1]}"
    home = tmp_path_factory.mktemp("user-suite")
    (home / "aws-config").write_text(f"[default]\nendpoint_url = {elsewhere}\nregion = eu-west-1\n")
    shell = {var: elsewhere for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL")}
    shell.update(AWS_CONFIG_FILE=str(home / "aws-config"), AWS_ACCESS_KEY_ID="real-looking")
    shell.update(MLFLOW_EXPERIMENT_ID="17", MLFLOW_RUN_ID="0123456789abcdef", TRACKING_EXPERIMENT="production")
    try:
        outcomes, output = run_user_suite(home, {"test_training.py": USER_SUITE}, env=shell)
    finally:
        server.shutdown()
    leftovers = sorted(path.name for path in home.iterdir())
    yield outcomes, list(_Recorder.requests), f"{output}\nleft in the working directory: {leftovers}"


def test_the_shells_servers_and_aws_config_get_no_request(user_suite: tuple[dict[str, str], list[str], str]) -> None:
    outcomes, requests, output = user_suite
    assert requests == [], output
    assert outcomes["test_registers_loads_and_lists_in_the_fixtures"] == "passed"


def test_an_experiment_or_registry_a_test_sets_is_not_the_next_tests(
    user_suite: tuple[dict[str, str], list[str], str],
) -> None:
    outcomes, _, _ = user_suite
    assert outcomes["test_sets_experiment_and_registry_of_its_own"] == "passed"
    assert outcomes["test_then_runs_go_to_its_stores_default_experiment"] == "passed"


def test_a_background_save_left_running_commits_within_its_own_test(
    user_suite: tuple[dict[str, str], list[str], str],
) -> None:
    outcomes, _, _ = user_suite
    assert outcomes["test_leaves_a_slow_background_save_running"] == "passed"
    assert outcomes["test_then_that_save_was_committed_in_its_own_test"] == "passed"


def test_a_failed_background_save_fails_its_own_tests_teardown(
    user_suite: tuple[dict[str, str], list[str], str],
) -> None:
    outcomes, _, _ = user_suite
    failed = outcomes["test_leaves_a_failing_background_save"]
    assert failed.startswith("error: failed on teardown"), failed
    assert "a background checkpoint save of this test failed" in failed and "bucket 'tracking-test'" in failed
    assert "tracking.wait_for_checkpoints()" in failed
    assert outcomes["test_then_saves_of_its_own_succeed"] == "passed"


def test_run_artifacts_stay_in_the_tests_tmp_path(user_suite: tuple[dict[str, str], list[str], str]) -> None:
    outcomes, _, output = user_suite
    assert outcomes["test_keeps_artifacts_in_its_tmp_path"] == "passed"
    assert "mlruns" not in output.rsplit("left in the working directory:", 1)[1], output
