"""The local stack for real: processes, ports, pid files, data that survives restarts, artifacts on S3."""

from __future__ import annotations

import os
import socket
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from tracking.cli import main, server
from tracking.localstack import LocalStack

pytestmark = pytest.mark.integration

Keys = Callable[[LocalStack, str], list[str]]


def _cli_args(stack: LocalStack) -> list[str]:
    return ["--data-dir", str(stack.data_dir), "--s3-port", str(stack.s3_port), "--mlflow-port", str(stack.mlflow_port)]


def _gone(pid: int) -> bool:
    """True when neither the process nor anything in its process group (its workers) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_up_is_idempotent_and_data_survives_down_and_up(
    new_stack: Callable[..., LocalStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = new_stack()
    runner = CliRunner()
    # The CLI's `up` reads the keys from the environment, the stack above has none: a shell with AWS keys
    # exported would be another setting.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)

    assert sorted(stack.up()) == ["mlflow", "seaweedfs"]
    first = {s.name: s.pid for s in stack.status().services}
    assert stack.up() == []  # idempotent: recognises its own live processes
    assert {s.name: s.pid for s in stack.status().services} == first

    # A second `up` through the CLI (a new LocalStack, as from another shell) starts nothing either.
    again = runner.invoke(main, ["stack", "up", *_cli_args(stack)])
    assert again.exit_code == 0, again.output
    assert again.output.count("already running") == 2
    assert f"export MLFLOW_TRACKING_URI={stack.tracking_uri}" in again.output
    assert {s.name: s.pid for s in stack.status().services} == first
    assert f"export MLFLOW_S3_ENDPOINT_URL={stack.s3_endpoint_url}\n" in stack.env_file.read_text()
    assert (stack.data_dir / "run" / "seaweedfs.pid").read_text().strip() == str(first["seaweedfs"])
    assert stack.log_path("mlflow").stat().st_size > 0

    shown = runner.invoke(main, ["stack", "status", "--data-dir", str(stack.data_dir)])
    assert shown.exit_code == 0, shown.output
    for name, pid in first.items():
        assert name in shown.output
        assert str(pid) in shown.output
    assert shown.output.count("running") == 2
    assert stack.tracking_uri in shown.output

    # Something in each store that must survive a restart.
    stack.s3_client().put_object(Bucket=stack.bucket, Key="survivor.txt", Body=b"still here")
    experiment_id = MlflowClient(stack.tracking_uri).create_experiment(f"survivor-{uuid.uuid4().hex[:8]}")

    stopped = runner.invoke(main, ["stack", "down", "--data-dir", str(stack.data_dir)])
    assert stopped.exit_code == 0, stopped.output
    assert all(_gone(pid) for pid in first.values() if pid is not None)
    assert not any(s.alive for s in stack.status().services)
    assert not (stack.data_dir / "run" / "mlflow.pid").exists()
    for port in (stack.s3_port, stack.mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"
    assert runner.invoke(main, ["stack", "down", "--data-dir", str(stack.data_dir)]).output.strip() == (
        "nothing was running"
    )

    assert sorted(stack.up()) == ["mlflow", "seaweedfs"]
    assert {s.name: s.pid for s in stack.status().services} != first
    body = stack.s3_client().get_object(Bucket=stack.bucket, Key="survivor.txt")["Body"].read()
    assert body == b"still here"
    assert MlflowClient(stack.tracking_uri).get_experiment(experiment_id).lifecycle_stage == "active"


def test_busy_port_is_a_one_line_error(new_stack: Callable[..., LocalStack]) -> None:
    stack = new_stack()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.mlflow_port))
        squatter.listen()
        result = CliRunner().invoke(main, ["stack", "up", *_cli_args(stack)])

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(stack.mlflow_port) in lines[0]
    assert "log" not in lines[0]  # nothing started, so no log to name
    assert "Traceback" not in result.output
    assert not any(s.alive for s in stack.status().services)  # nothing half-started
    assert not stack.data_dir.exists()  # no data folder with an empty mlflow.db left behind


def test_the_stack_is_found_from_any_folder(
    new_stack: Callable[..., LocalStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("TRACKING_DATA_DIR", raising=False)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "x")  # restored after the test: the CLI sets what is unset
        monkeypatch.delenv(name)
    monkeypatch.setattr(server, "_announced", False)
    stack = new_stack("project/.tracking")  # stopped after the test whatever happens
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "project").mkdir()
    runner = CliRunner()
    ports = ["--s3-port", str(stack.s3_port), "--mlflow-port", str(stack.mlflow_port)]

    monkeypatch.chdir(tmp_path / "project")
    started = runner.invoke(main, ["stack", "up", *ports])
    assert started.exit_code == 0, started.output

    monkeypatch.chdir(tmp_path / "elsewhere")
    status = runner.invoke(main, ["stack", "status"])
    assert status.exit_code == 0, status.output
    assert status.output.count(" running ") == 2 and f"data folder: {stack.data_dir} " in status.output
    listed = runner.invoke(main, ["runs", "--experiment", "Default"])
    assert listed.exit_code == 0, listed.output
    assert f"using the local stack at {stack.tracking_uri}" in listed.stderr
    again = runner.invoke(main, ["stack", "up"])  # finds the running stack: idempotent, its own ports
    assert again.exit_code == 0 and again.output.count("already running") == 2, again.output

    other = tmp_path / "other"
    busy = runner.invoke(main, ["stack", "up", "--data-dir", str(other), *ports])
    assert busy.exit_code == 1
    [line] = busy.stderr.splitlines()
    assert f"is taken by your local stack in {stack.data_dir}" in line and "tracking stack down --data-dir" in line
    assert not other.exists()
    assert not (tmp_path / "elsewhere" / ".tracking").exists()

    stopped = runner.invoke(main, ["stack", "down"])
    assert stopped.exit_code == 0 and stopped.output.strip() == "stopped: mlflow, seaweedfs", stopped.output
    assert list((tmp_path / "state" / "tracking" / "stacks").iterdir()) == []


def test_server_dying_on_start_is_a_one_line_error_and_leaves_nothing(
    new_stack: Callable[..., LocalStack], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    stack = new_stack()
    bad_uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"  # a folder inside a file: cannot exist
    result = CliRunner().invoke(main, ["stack", "up", *_cli_args(stack), "--backend-store-uri", bad_uri])

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "mlflow exited during start" in lines[0]
    assert str(stack.log_path("mlflow")) in lines[0]
    # SeaweedFS, started by the same `up`, was stopped again.
    assert not any(s.alive for s in stack.status().services)
    assert not (stack.data_dir / "run" / "seaweedfs.pid").exists()


def test_usage_error_exits_2() -> None:
    result = CliRunner().invoke(main, ["stack", "up", "--s3-port", "not-a-port"])
    assert result.exit_code == 2


def test_mlflow_server_answers_health(stack: LocalStack) -> None:
    with urllib.request.urlopen(f"{stack.tracking_uri}/health", timeout=5) as response:
        assert response.status == 200
        assert response.read().strip() == b"OK"


def test_logged_artifact_lands_in_the_bucket(stack: LocalStack, s3_keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    if stack.serve_artifacts:
        # Proxied mode: the client needs no S3 access at all, only the tracking server.
        for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
    experiment = mlflow.set_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.1)
        mlflow.log_text("hello from the stack", "notes/hello.txt")

    run_id = run.info.run_id
    scheme = "mlflow-artifacts:" if stack.serve_artifacts else "s3://"
    assert run.info.artifact_uri.startswith(scheme)
    key = f"mlartifacts/{experiment.experiment_id}/{run_id}/artifacts/notes/hello.txt"
    assert key in s3_keys(stack, f"mlartifacts/{experiment.experiment_id}/")
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt") == "hello from the stack"
    assert mlflow.get_run(run_id).data.params == {"lr": "0.1"}
