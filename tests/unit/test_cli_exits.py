"""How a command ends when its arguments, its user or its reader stop it: the status and the one line it prints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner

from tracking.cli import inspect, main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "args",
    [
        ["download", "../x", "--to", "out"],
        ["checkpoints", "a run"],
        ["show", "runs:/a run"],
        ["verify", "--", "--json"],
        ["gc", "1 2", "--keep-last", "1"],
        ["register", "run.1", "seed"],
    ],
)
def test_a_malformed_run_id_is_a_usage_error_saying_what_a_run_id_looks_like(
    tracking_store: str, args: list[str]
) -> None:
    # Was: "error: run ... not found on tracking server ..." and exit 1, as for a run deleted since.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "is not a run ID: a run ID is 32 hex characters" in result.stderr, result.stderr
    assert "models:/<name>@<alias>" in result.stderr and "Traceback" not in result.output


def test_a_malformed_run_id_with_json_prints_the_usage_error_as_json(tracking_store: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "a run", "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert (error["exit_code"], error["type"]) == (2, "BadParameter") and "32 hex characters" in error["error"]


@pytest.mark.parametrize(
    ("args", "option"),
    [(["download", "f" * 32, "--to", ""], "--to"), (["runs", "--experiment", " "], "--experiment")],
)
def test_an_empty_folder_or_experiment_name_is_a_usage_error(
    tracking_store: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, args: list[str], option: str
) -> None:
    # Was: --to "" downloaded into the current folder, --experiment "" listed the default experiment.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr and "names no" in result.stderr, result.stderr
    assert list(here.iterdir()) == []


def test_a_run_id_mlflow_takes_that_names_no_run_is_not_found_and_says_what_run_ids_look_like(
    tracking_store: str,
) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "not-a-run"])
    assert result.exit_code == 1, result.output
    assert "run not-a-run not found" in result.stderr and "32 hex characters" in result.stderr, result.stderr
    issued = CliRunner().invoke(main, ["checkpoints", "f" * 32])
    assert issued.exit_code == 1 and "32 hex" not in issued.stderr, issued.stderr  # its shape is right


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_ctrl_c_exits_130_with_one_line_and_json_when_asked(
    monkeypatch: pytest.MonkeyPatch, as_json: list[str]
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "connect", interrupted)
    result = CliRunner().invoke(main, ["runs", *as_json])
    # Was: "Aborted!" and exit 1, the status of a command that failed; nothing on stdout with --json.
    assert result.exit_code == 130, result.output
    assert result.stderr == "error: interrupted (Ctrl-C).\n", result.stderr
    if as_json:
        assert json.loads(result.stdout) == {
            "error": "interrupted (Ctrl-C).",
            "exit_code": 130,
            "type": "KeyboardInterrupt",
        }
    else:
        assert result.stdout == ""


def test_ctrl_c_while_a_command_waits_for_its_server_exits_130(tmp_path: Any) -> None:
    # A tracking server that takes the connection and never answers: the command waits in its request.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.getsockname()[1]}"}
        command = [sys.executable, "-m", "tracking", "runs", "--json"]
        # SIGINT as a shell leaves it to the commands it starts: pytest itself may have started with it ignored (a
        # script's background job does), and a child inherits an ignored signal. (What a test before this one left,
        # tests/conftest.py puts back.)
        with subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        ) as run:
            try:
                connection = _request_of(server, b"GET /api/2.0/mlflow/experiments/get-by-name")
                run.send_signal(signal.SIGINT)
                out, err = run.communicate(timeout=60)
                connection.close()
            finally:
                run.kill()
    assert run.returncode == 130, err.decode()
    assert err.decode().splitlines()[-1] == "error: interrupted (Ctrl-C).", err.decode()
    assert json.loads(out)["exit_code"] == 130


def _request_of(server: socket.socket, request: bytes) -> socket.socket:
    """The connection whose request starts with ``request``, the command's own: another test's client retrying a
    port that was free a moment ago may reach this one first, and the command must be in its request when it is
    interrupted."""
    for _ in range(5):
        connection, _ = server.accept()
        connection.settimeout(60)
        received = b""
        while len(received) < len(request) and (chunk := connection.recv(4096)):
            received += chunk
        if received.startswith(request):
            return connection
        connection.close()
    raise AssertionError(f"no request {request!r} reached the server")


def test_output_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path: Any) -> None:
    # `tracking ... > out.json` on a full disk (/dev/full: every write fails with ENOSPC).
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "tracking", "stack", "status", "--data-dir", str(tmp_path / "stack")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    # Was: an OSError traceback from click.echo.
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: cannot write the output (No space left on device): ") and (
        done.stderr.count("\n") == 1
    ), done.stderr


@pytest.mark.parametrize("command", [["stack", "status"], ["runs", "--json"]])
def test_a_reader_that_stops_early_ends_the_command_quietly_with_141(
    tracking_store: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # `tracking ... | head -1`: a reader that closed its end before the command wrote (every write fails, EPIPE).
    monkeypatch.setenv("TRACKING_EXPERIMENT", "piped")
    mlflow.create_experiment("piped")
    args = [*command, "--data-dir", str(tmp_path / "stack")] if command[0] == "stack" else command
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tracking", *args], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(writer)
    # Was: 1, click's, the status of a failed command: `set -o pipefail` scripts took it for one.
    assert done.returncode == 141, done.stderr
    assert done.stderr == "", done.stderr


def test_a_failure_into_a_closed_pipe_still_says_its_error_line_and_exits_1(tracking_store: str) -> None:
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tracking", "checkpoints", "f" * 32, "--json"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    # Was: nothing at all and 1: the JSON error object's write failed, and with it the error line.
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: run ffff") and done.stderr.count("\n") == 1, done.stderr


def test_only_click_echo_to_stderr_is_left_outside_what_tells_an_unwritable_output(tmp_path: Any) -> None:
    """Every write to stdout goes through tracking.output (echo, emit_json, table), which tells a closed pipe or a
    full disk apart from the command's own OSErrors; a bare click.echo to stdout would be a traceback again."""
    import ast
    from pathlib import Path

    import tracking

    root = Path(tracking.__file__).parent
    bare = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "output.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("click.echo", "click.secho", "print"):
                to_stderr = any(k.arg == "err" and ast.unparse(k.value) == "True" for k in node.keywords)
                if not to_stderr and not any(k.arg == "file" for k in node.keywords):
                    bare.append(f"{path.relative_to(root)}:{node.lineno}")
    assert bare == [], bare
