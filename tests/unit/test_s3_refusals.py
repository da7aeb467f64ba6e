"""What S3 answers when it will not serve a request: each refusal says the run, the object and what to do next."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from botocore.stub import Stubber

from tracking.config import TrackingConfig
from tracking.errors import StorageError
from tracking.storage.s3 import S3Store
from tracking.storage.s3_client import s3_client

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def fresh_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMPORARY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temporary-secret")
    s3_client.cache_clear()
    yield
    s3_client.cache_clear()


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """An S3 server throttling every request, as AWS does under load: 503 with S3's SlowDown error."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("code", ["ExpiredToken", "InvalidToken"])
def test_expired_session_credentials_say_to_refresh_them(code: str) -> None:
    store = S3Store("s3://team/exp/r1/artifacts", TrackingConfig(s3_endpoint_url="http://127.0.0.1:9"), "run r1")
    with Stubber(store.client) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=400)
        with pytest.raises(StorageError) as raised:
            store.read("manifest.json")
    message = str(raised.value)
    assert message.startswith("run r1: s3://team/exp/r1/artifacts/manifest.json: ")
    assert f"expired or invalid ({code})" in message and "AWS_SESSION_TOKEN" in message and "retry" in message


def test_a_throttling_server_is_retried_a_bounded_number_of_times_then_said_to_be_busy() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        store = S3Store("s3://team/exp/r1/artifacts", TrackingConfig(s3_endpoint_url=endpoint), "run r1")
        with pytest.raises(StorageError) as raised:
            store.read("manifest.json")
    finally:
        server.shutdown()
        server.server_close()
    assert _SlowDown.requests == 2  # botocore's standard retry, bounded by S3_MAX_ATTEMPTS
    message = str(raised.value)
    assert "run r1" in message and f"S3 at {endpoint} kept answering SlowDown (attempts: 2)" in message
    assert "retry later" in message and "TRACKING_S3_MAX_CONCURRENCY" in message


def test_an_endpoint_set_by_aws_endpoint_url_s3_is_the_one_named_when_it_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # botocore's own variable: MLflow's S3 client and ours both follow it where MLFLOW_S3_ENDPOINT_URL is unset.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = S3Store("s3://team/exp/r1/artifacts", TrackingConfig.from_env(), "run r1")
    with pytest.raises(StorageError) as raised:
        store.read("manifest.json")
    message = str(raised.value)
    assert f"cannot reach S3 at {closed} " in message and "check AWS_ENDPOINT_URL_S3 " in message
    assert "AWS default endpoint" not in message


def test_a_part_answered_with_no_etag_fails_the_write_in_words_and_leaves_no_upload(mocked_s3: object) -> None:
    # A proxy that drops response headers: completing a multipart upload needs every part's ETag.
    store = S3Store("s3://unit-artifacts/exp/r1/artifacts", TrackingConfig.from_env(part_size_mb=5), "run r1")
    store.client.meta.events.register("after-call.s3.UploadPart", lambda parsed, **_: parsed.pop("ETag", None))
    data = b"w" * (11 * 1024 * 1024)
    with pytest.raises(StorageError) as raised:
        store.write("checkpoint.pt", lambda stream: stream.write(data))
    message = str(raised.value)
    assert message.startswith("run r1: ") and "s3://unit-artifacts/exp/r1/artifacts/checkpoint.pt" in message
    assert "no ETag" in message and "TRACKING_S3_PART_SIZE_MB" in message
    assert store.list_files("") == [] and store.pending_uploads("") == []
