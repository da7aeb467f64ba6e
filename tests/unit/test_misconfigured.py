"""A user's first hour against their team's servers: each setting got wrong fails in one line that says what to fix."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracking.cli import main

REPO = Path(__file__).resolve().parents[2]


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """An HTTP server that is no MLflow server (S3, a proxy, another service): 404 for everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><h1>Not Found</h1></html>")

    do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def not_mlflow_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_cli_against_a_closed_tracking_port_fails_in_seconds_in_one_line(closed_url: str) -> None:
    # MLflow's own retries (7, 120 s each) would keep `tracking runs` waiting for minutes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_TRACKING_URI"] = closed_url
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tracking", "runs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - began
    assert done.returncode == 1, done.stderr[-2000:]
    assert elapsed < 20, f"took {elapsed:.1f} s"
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and closed_url in line and "MLFLOW_TRACKING_URI" in line


def test_the_cli_against_a_server_that_is_not_mlflow_says_so_in_one_line(
    not_mlflow_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", not_mlflow_url)
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and not_mlflow_url in line and "MLFLOW_TRACKING_URI" in line
