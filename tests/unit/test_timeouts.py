"""Transport failures: dead and silent endpoints fail in bounded time, dropped downloads say "retry".

The endpoints are real sockets on 127.0.0.1: a closed port (connection refused) and a server
that accepts connections and never answers. Fast tests set small timeouts through the
documented variables. The defaults' own bounds (a silent endpoint: about 30 s) are measured by
tests/reliability/test_timeouts.py: the unit tier waits out no real timeout.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracking.config import MLFLOW_REQUEST_DEFAULTS, TrackingConfig, bound_mlflow_requests
from tracking.deadline import GRACE_SHARE
from tracking.errors import ConfigError, StorageError
from tracking.manifest import StoredFile
from tracking.storage.s3 import S3Store
from tracking.storage.s3_client import s3_client


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte; closes them all on stop()."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_url() -> Iterator[str]:
    server = SilentServer()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Botocore with no attempts or timeouts set from outside: no env, no profile file."""
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE", "TRACKING_S3_CONNECT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TRACKING_S3_READ_TIMEOUT", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3_client.cache_clear()
    yield monkeypatch
    s3_client.cache_clear()


def store_at(endpoint: str) -> S3Store:
    config = TrackingConfig.from_env(s3_endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="y")
    return S3Store("s3://b/k", config, owner="run r")


def timed_failure(call: Any) -> tuple[float, StorageError]:
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call()
    return time.monotonic() - start, caught.value


# ------------------------------------------------------------------ S3


def test_s3_timeouts_come_from_the_environment(s3_env: pytest.MonkeyPatch) -> None:
    s3_env.setenv("TRACKING_S3_CONNECT_TIMEOUT", "1.5")
    s3_env.setenv("TRACKING_S3_READ_TIMEOUT", "2")
    client = store_at("http://127.0.0.1:1").client
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (1.5, 2.0)
    assert client.meta.config.retries["total_max_attempts"] == 2


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="TRACKING_S3_READ_TIMEOUT"):
        TrackingConfig.from_env({"TRACKING_S3_READ_TIMEOUT": value})


def test_botocore_attempt_variables_win_over_the_default(s3_env: pytest.MonkeyPatch) -> None:
    s3_env.setenv("AWS_MAX_ATTEMPTS", "5")
    s3_env.setenv("AWS_RETRY_MODE", "adaptive")
    retries = store_at("http://127.0.0.1:1").client.meta.config.retries
    assert (retries["total_max_attempts"], retries["mode"]) == (5, "adaptive")


@pytest.mark.parametrize("operation", ["read", "read_expected", "write_bytes", "write_multipart"])
def test_a_silent_s3_endpoint_fails_within_the_configured_bound(
    s3_env: pytest.MonkeyPatch, silent_url: str, operation: str
) -> None:
    s3_env.setenv("TRACKING_S3_CONNECT_TIMEOUT", "1")
    s3_env.setenv("TRACKING_S3_READ_TIMEOUT", "1")
    store = store_at(silent_url)
    calls = {
        "read": lambda: store.read("f"),
        "read_expected": lambda: store.read("f", StoredFile(10, "0" * 64)),
        "write_bytes": lambda: store.write_bytes("f", b"x" * 1000),
        # More than one part: create_multipart_upload is the first request.
        "write_multipart": lambda: store.write("f", lambda stream: stream.write(b"x" * (store.config.part_size + 1))),
    }
    elapsed, error = timed_failure(calls[operation])
    # 2 attempts x 1 s read timeout, plus backoff and the abort of the upload.
    assert elapsed < 10, f"{operation} took {elapsed:.1f} s"
    assert "run r" in str(error) and "retry" in str(error)
    assert "did not answer in time" in str(error) and "TRACKING_S3_READ_TIMEOUT" in str(error)


@pytest.mark.parametrize("operation", ["read", "write_bytes"])
def test_a_closed_s3_port_fails_fast(s3_env: pytest.MonkeyPatch, closed_url: str, operation: str) -> None:
    store = store_at(closed_url)
    call = (lambda: store.read("f")) if operation == "read" else (lambda: store.write_bytes("f", b"x"))
    elapsed, error = timed_failure(call)
    assert elapsed < 10, f"{operation} took {elapsed:.1f} s"
    assert "cannot reach S3" in str(error) and closed_url in str(error)


def test_a_closed_s3_port_fails_fast_by_default(s3_env: pytest.MonkeyPatch, closed_url: str) -> None:
    elapsed, error = timed_failure(lambda: store_at(closed_url).read("f"))
    print(f"closed S3 port, defaults: {elapsed:.1f} s")
    assert elapsed < 10 and "cannot reach S3" in str(error)


# ------------------------------------------------------------------ a download cut short


class CutBody:
    """A response body that delivers ``limit`` bytes, then ends (``error`` None) or raises ``error``."""

    def __init__(self, body: Any, limit: int, error: BaseException | None) -> None:
        self.body, self.left, self.error = body, limit, error

    def readinto(self, out: Any) -> int:
        if self.left <= 0:
            if self.error is not None:
                raise self.error
            return 0
        view = memoryview(out)[: self.left]
        n = int(self.body.readinto(view))
        self.left -= n
        return n

    def close(self) -> None:
        self.body.close()


def _streaming_errors() -> list[BaseException | None]:
    import urllib3.exceptions
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return [
        None,
        ResponseStreamingError(error="Connection broken: IncompleteRead"),
        IncompleteReadError(actual_bytes=10, expected_bytes=20),
        ReadTimeoutError(endpoint_url="http://s3"),
        urllib3.exceptions.ProtocolError("Connection broken"),
        http.client.IncompleteRead(b"partial", 10),
        ConnectionResetError(104, "Connection reset by peer"),
    ]


@pytest.mark.parametrize("error", _streaming_errors(), ids=lambda e: "ends-early" if e is None else type(e).__name__)
@pytest.mark.parametrize("expected", [True, False], ids=["ranged", "whole"])
def test_an_interrupted_download_is_a_storage_error_not_corruption(
    mocked_s3: Any, monkeypatch: pytest.MonkeyPatch, error: BaseException | None, expected: bool
) -> None:
    from tests.unit.conftest import BUCKET

    store = S3Store(f"s3://{BUCKET}/cut", TrackingConfig.from_env(), owner=f"run {'0' * 32}")
    data = os.urandom(300_000)
    stored = store.write_bytes("f.bin", data)
    real_fill = S3Store._fill

    def cut_fill(self: S3Store, target: Any, body: Any, out: memoryview, offset: int) -> None:
        real_fill(self, target, CutBody(body, 1000, error), out, offset)

    monkeypatch.setattr(S3Store, "_fill", cut_fill)
    with pytest.raises(StorageError) as caught:
        store.read("f.bin", stored if expected else None)
    message = str(caught.value)
    assert "retry" in message and "0" * 32 in message and "f.bin" in message
    assert "corrupt" not in message.replace("not corruption", "")
    monkeypatch.setattr(S3Store, "_fill", real_fill)
    assert bytes(store.read("f.bin", stored)) == data  # the object was intact all along


# ------------------------------------------------------------------ MLflow


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The three MLflow variables unset ("" counts as unset), restored after the test."""
    for var in MLFLOW_REQUEST_DEFAULTS:
        monkeypatch.setenv(var, "")
    return monkeypatch


def test_bound_mlflow_requests_sets_only_what_the_user_left_unset() -> None:
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": ""}
    applied = bound_mlflow_requests(env)
    assert applied == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert bound_mlflow_requests(env) == {}


def mlflow_get_run(url: str) -> tuple[float, BaseException]:
    from mlflow.tracking import MlflowClient

    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        MlflowClient(tracking_uri=url).get_run("0" * 32)
    return time.monotonic() - start, caught.value


def test_a_silent_tracking_server_fails_within_the_configured_bound(
    mlflow_env: pytest.MonkeyPatch, silent_url: str
) -> None:
    from mlflow.exceptions import MlflowException

    mlflow_env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    bound_mlflow_requests()
    # 3 attempts x 1 s + backoff of at most 0 + (2 + 1) s.
    elapsed, error = mlflow_get_run(silent_url)
    assert isinstance(error, MlflowException)
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_a_closed_tracking_port_fails_fast_by_default(mlflow_env: pytest.MonkeyPatch, closed_url: str) -> None:
    bound_mlflow_requests()
    elapsed, _ = mlflow_get_run(closed_url)
    print(f"closed tracking port, defaults: {elapsed:.1f} s")
    assert elapsed < 10


# ------------------------------------------------------------------ one deadline per save


@pytest.fixture
def short_bounds(mlflow_env: pytest.MonkeyPatch) -> float:
    """Timeouts of 2 s for both servers, no jitter; returns the operation bound they make (5 s)."""
    for var, value in {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "TRACKING_S3_CONNECT_TIMEOUT": "2",
        "TRACKING_S3_READ_TIMEOUT": "2",
    }.items():
        mlflow_env.setenv(var, value)
    mlflow_env.delenv("AWS_MAX_ATTEMPTS", raising=False)
    return TrackingConfig.from_env().operation_bound()


@pytest.mark.parametrize("silent_from", ["reading tags after READY", "setting tags", "marking READY"])
def test_a_tracking_server_silent_mid_commit_fails_the_save_within_one_bound(
    s3_experiment: str, short_bounds: float, silent_url: str, monkeypatch: pytest.MonkeyPatch, silent_from: str
) -> None:
    """The follow-ups of a failed commit (did the tags move? mark FAILED) share the failed request's
    deadline: each used to wait a full timeout of its own (3 x 27 s with the defaults)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import tracking
    from pipelines.models import Model

    assert short_bounds == 2 * 2 + 1  # S3: 2 attempts x 2 s + 1 s backoff; MLflow: 2 x 2 s
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")

        def go_silent(client: MlflowClient) -> None:
            client._tracking_client.tracking_uri = silent_url  # every later request of this client

        real_finalize, real_log_batch = MlflowClient.finalize_logged_model, MlflowClient.log_batch

        def finalize(self: MlflowClient, model_id: str, status: Any) -> Any:
            if silent_from == "marking READY":
                go_silent(self)
            done = real_finalize(self, model_id, status)
            if silent_from == "reading tags after READY":
                go_silent(self)
            return done

        def log_batch(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
            go_silent(self)
            return real_log_batch(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "finalize_logged_model", finalize)
            patch.setattr(MlflowClient, "log_batch", log_batch)
            elapsed, error = timed_failure(
                lambda: tracking.log_checkpoint(model, epoch=2, metrics={"val_loss": 0.1}, monitor="val_loss")
            )
    print(f"tracking server silent from {silent_from}: {elapsed:.1f} s (bound {short_bounds:g} s)")
    # The failed request itself takes its 4 s; everything after it shares the 5 s deadline
    # (was: 8 s for READY, 12 s once the tag request was sent).
    assert elapsed < short_bounds + 1.5, f"took {elapsed:.1f} s"
    assert "epoch 2 was not committed" in str(error)
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1]


def test_s3_silent_once_a_multipart_upload_began_fails_within_one_bound(
    s3_env: pytest.MonkeyPatch, silent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abort after a part failed shares that part's deadline: it used to wait a full bound of its
    own (part with its retry, then the abort: 2 x 31 s with the defaults)."""
    s3_env.setenv("TRACKING_S3_CONNECT_TIMEOUT", "2")
    s3_env.setenv("TRACKING_S3_READ_TIMEOUT", "2")
    store = store_at(silent_url)
    bound = store.config.s3_request_bound()
    assert bound == 2 * 2 + 1
    # The upload is created (answered), then the server goes silent: parts and the abort get no answer.
    monkeypatch.setattr(store.client, "create_multipart_upload", lambda **kwargs: {"UploadId": "u-1"})
    failed_at: list[float] = []
    real_upload_part = store.client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        try:
            return real_upload_part(**kwargs)
        finally:
            failed_at.append(time.monotonic())

    monkeypatch.setattr(store.client, "upload_part", upload_part)
    size = 2 * store.config.part_size + 1
    elapsed, error = timed_failure(lambda: store.write("f", lambda stream: stream.write(b"x" * size)))
    after_parts = time.monotonic() - max(failed_at)
    print(f"S3 silent after the upload began: {elapsed:.1f} s, {after_parts:.1f} s of it after the parts failed")
    # Each part waits for its own attempts (1 s for "100 Continue", then 2 s, twice); the abort then
    # gets the grace only (was: its own 2 attempts x 2 s + backoff).
    assert after_parts < bound * GRACE_SHARE + 0.5, f"{after_parts:.1f} s after the parts failed"
    assert elapsed < 2 * bound, f"took {elapsed:.1f} s"
    assert "run r" in str(error) and "retry" in str(error)


class PausingS3(threading.Thread):
    """An S3 endpoint that sends an object's first ``part`` bytes and then pauses for good:
    a GET of the whole object stops after them; a ranged GET from ``part`` on gets no answer."""

    def __init__(self, size: int, part: int) -> None:
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                spec = self.headers.get("Range", "")
                start, end = 0, size - 1
                if spec:
                    first, _, last = spec.removeprefix("bytes=").partition("-")
                    start, end = int(first), int(last)
                if start >= part:
                    outer.stop.wait(60)  # the pause: no answer at all
                    return
                self.send_response(206 if spec else 200)
                self.send_header("Content-Length", str(end - start + 1))
                if spec:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                self.wfile.write(bytes(min(end + 1, part) - start))
                self.wfile.flush()
                if end + 1 > part:
                    outer.stop.wait(60)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


READ_THEN_EXIT = """
import json, sys, time
from tracking.config import TrackingConfig
from tracking.errors import StorageError
from tracking.manifest import StoredFile
from tracking.storage.s3 import S3Store

size = int(sys.argv[1])
store = S3Store("s3://b/k", TrackingConfig.from_env(), owner="run r")
start = time.time()
try:
    store.read("f", StoredFile(size, "0" * 64))
except StorageError as exc:
    print(json.dumps({"start": start, "failed": time.time(), "error": str(exc)}), flush=True)
"""


def test_a_download_paused_mid_read_returns_within_one_bound(s3_env: pytest.MonkeyPatch) -> None:
    """The process returns once the read failed: no worker thread goes on retrying a range (or waits its
    turn to start one) while the interpreter waits for it at exit."""
    import json
    import subprocess
    import sys

    part, parts = 5 * 2**20, 8
    server = PausingS3(parts * part, part)
    server.start()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "TRACKING_S3_PART_SIZE_MB": "5",
        "TRACKING_S3_MAX_CONCURRENCY": "2",
        "TRACKING_S3_CONNECT_TIMEOUT": "2",
        "TRACKING_S3_READ_TIMEOUT": "2",
    }
    bound = TrackingConfig.from_env(env).s3_request_bound()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", READ_THEN_EXIT, str(parts * part)],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
        )
        exited = time.time()
    finally:
        server.close()
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"paused S3: error after {result['failed'] - result['start']:.1f} s, exit {exited - result['start']:.1f} s")
    assert "retry" in result["error"]
    assert exited - result["start"] < bound + 1.5, f"returned {exited - result['start']:.1f} s after the call"
    assert exited - result["failed"] < 1.5, f"exited {exited - result['failed']:.1f} s after the error"


def test_the_operation_bound_is_the_longest_request_with_the_default_settings(s3_env: pytest.MonkeyPatch) -> None:
    from tracking.config import mlflow_request_bound

    # MLflow: 3 attempts x 8 s + backoff 0 + (2 x 1 + 1 jitter); S3: 2 attempts x 15 s + up to 1 s backoff.
    assert mlflow_request_bound(dict(MLFLOW_REQUEST_DEFAULTS)) == 27
    assert TrackingConfig().s3_request_bound() == 31
    s3_env.setenv("AWS_MAX_ATTEMPTS", "3")
    assert TrackingConfig().s3_request_bound() == 3 * 15 + 1 + 2
