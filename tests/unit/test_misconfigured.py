"""A user's first hour against their team's servers: each setting got wrong fails in one line that says what to fix."""

from __future__ import annotations

import http.server
import importlib
import json
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
from tracking.config import TrackingConfig
from tracking.errors import ConfigError, NotFoundError, StorageError

REPO = Path(__file__).resolve().parents[2]


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """An HTTP server that is no MLflow server (S3, a proxy, another service): 404 for everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        # Flask's own page (the MLflow server's), which is no XML at all.
        self.wfile.write(b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n")

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


@pytest.mark.parametrize("value", ["127.0.0.1:5000", "localhost:5000", "mlflow.example.com:443/"])
def test_a_tracking_uri_without_its_scheme_is_refused_with_the_fix(value: str) -> None:
    # MLflow would take "localhost:5000" for a folder of a local file store, and fail elsewhere.
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as raised:
        TrackingConfig.from_env({"MLFLOW_TRACKING_URI": value})
    assert f"http://{value}" in str(raised.value)


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:5000/", "sqlite:///tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "databricks"]
)
def test_tracking_uris_mlflow_accepts_still_pass(value: str) -> None:
    assert TrackingConfig.from_env({"MLFLOW_TRACKING_URI": value}).tracking_uri == value


def test_an_s3_endpoint_with_a_path_is_refused_before_anything_is_stored_under_the_wrong_key() -> None:
    # botocore puts the path in front of every key: http://minio:9000/mlflow would write bucket
    # "mlflow", key "mlflow/<artifact path>", where no reader with the right endpoint looks.
    with pytest.raises(ConfigError, match="MLFLOW_S3_ENDPOINT_URL") as raised:
        TrackingConfig.from_env({"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000/mlflow"})
    assert "http://127.0.0.1:9000" in str(raised.value) and "'/mlflow'" in str(raised.value)
    assert TrackingConfig.from_env({"MLFLOW_S3_ENDPOINT_URL": "https://minio.example.com/"}).s3_endpoint_url


@pytest.mark.parametrize("operation", ["write", "read", "list"])
def test_an_s3_endpoint_that_is_no_s3_server_is_named_not_taken_for_a_missing_file(
    not_mlflow_url: str, operation: str
) -> None:
    # MLFLOW_S3_ENDPOINT_URL set to the MLflow server's address: every request gets an HTML 404.
    from tracking.storage.s3 import S3Store

    config = TrackingConfig(s3_endpoint_url=not_mlflow_url, aws_access_key_id="k", aws_secret_access_key="s")
    store = S3Store("s3://bucket/exp/run/artifacts", config, owner="run r1")
    calls = {
        "write": lambda: store.write_bytes("f", b"x"),
        "read": lambda: store.read("f"),
        "list": lambda: store.list_files(""),
    }
    with pytest.raises(StorageError) as raised:
        calls[operation]()
    assert not isinstance(raised.value, NotFoundError)
    message = str(raised.value)
    assert "run r1" in message and not_mlflow_url in message and "MLFLOW_S3_ENDPOINT_URL" in message


def test_credentials_allowed_to_read_but_not_to_write_are_told_so_not_to_recheck_the_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import boto3
    from moto import mock_aws
    from moto.core import set_initial_no_auth_action_count

    from tracking.storage.s3 import S3Store
    from tracking.storage.s3_client import s3_client

    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "setup")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "setup")
    s3_client.cache_clear()
    read_only = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}

    @set_initial_no_auth_action_count(5)  # the setup's requests below; every later one is checked
    def scenario() -> None:
        with mock_aws():
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket="team")
            s3.put_object(Bucket="team", Key="exp/run/artifacts/kept", Body=b"stored")
            iam = boto3.client("iam", region_name="us-east-1")
            iam.create_user(UserName="reader")
            key = iam.create_access_key(UserName="reader")["AccessKey"]
            iam.put_user_policy(
                UserName="reader",
                PolicyName="read-only",
                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [read_only]}),
            )
            config = TrackingConfig(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
            store = S3Store("s3://team/exp/run/artifacts", config, owner="run r1")
            assert bytes(store.read("kept")) == b"stored"  # the keys themselves are right
            with pytest.raises(StorageError) as raised:
                store.write_bytes("new", b"x")
            message = str(raised.value)
            assert "run r1" in message and "AccessDenied" in message and "write" in message
            assert "'team'" in message and "check AWS_ACCESS_KEY_ID" not in message
            assert bytes(store.read("kept")) == b"stored"

    try:
        scenario()
    finally:
        s3_client.cache_clear()


@pytest.mark.parametrize("value", ["yes", "on", "no", "off", ""])
def test_an_ignore_tls_value_mlflow_itself_would_refuse_is_refused_first(value: str) -> None:
    # MLflow's own S3 client reads the variable too, and raises a bare ValueError at the whole
    # model's upload, after the training and the checkpoints, for anything but true/false/1/0.
    with pytest.raises(ConfigError, match="MLFLOW_S3_IGNORE_TLS"):
        TrackingConfig.from_env({"MLFLOW_S3_IGNORE_TLS": value})


@pytest.mark.parametrize(
    ("value", "ignored"), [("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False)]
)
def test_ignore_tls_values_mlflow_accepts_pass(value: str, ignored: bool) -> None:
    assert TrackingConfig.from_env({"MLFLOW_S3_IGNORE_TLS": value}).s3_ignore_tls is ignored


def test_an_aws_profile_that_does_not_exist_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tracking.storage.s3_client import s3_client

    (tmp_path / "config").write_text("[profile team]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "teem")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    s3_client.cache_clear()
    try:
        with pytest.raises(ConfigError, match="AWS_PROFILE='teem'") as raised:
            s3_client(TrackingConfig(s3_endpoint_url="http://127.0.0.1:9000"))
    finally:
        s3_client.cache_clear()
    assert str(tmp_path / "config") in str(raised.value)


@pytest.mark.parametrize("configured", [True, False])
def test_the_default_profile_of_the_credentials_file_is_used_and_none_anywhere_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, configured: bool
) -> None:
    # `aws configure` writes the default profile, with no variable set: refused as "no S3 credentials".
    from tracking.storage.s3_client import s3_client

    if configured:
        profile = "[default]\naws_access_key_id = AKIAFROMFILE\naws_secret_access_key = s\n"
        (tmp_path / "credentials").write_text(profile)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role asked for, here or anywhere
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s3_client.cache_clear()
    try:
        if configured:
            client = s3_client(TrackingConfig(s3_endpoint_url="http://127.0.0.1:9000"))
            assert client._request_signer._credentials.access_key == "AKIAFROMFILE"
        else:
            with pytest.raises(ConfigError, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
                s3_client(TrackingConfig(s3_endpoint_url="http://127.0.0.1:9000"))
    finally:
        s3_client.cache_clear()


@pytest.mark.parametrize("pipeline", ["pipelines.train", "pipelines.lightning_digits", "pipelines.hf_digits"])
def test_a_pipeline_whose_store_refuses_stops_before_training_not_at_its_first_checkpoint(
    tracking_s3: str, tracking_store: str, monkeypatch: pytest.MonkeyPatch, pipeline: str
) -> None:
    # An experiment made on the team's server with a bucket these credentials never see: the
    # first save is an epoch (hours, on real data) away.
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import mlflow

    main = importlib.import_module(pipeline).main
    mlflow.create_experiment("elsewhere", artifact_location="s3://no-such-bucket/elsewhere")
    monkeypatch.setenv("TRACKING_EXPERIMENT", "elsewhere")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--epochs", "1"])
    assert code == 1
    line = err.getvalue().splitlines()[-1]
    assert "was not committed" not in line, "it trained an epoch first"
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert line.startswith(f"error: run {run.info.run_id}") and "'no-such-bucket' does not exist" in line
    assert run.info.status == "FAILED"


def test_a_pipeline_pointed_at_a_server_that_is_not_mlflow_names_it_in_one_line(
    not_mlflow_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from pipelines import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", not_mlflow_url)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = train.main(["--epochs", "1"])
    assert code == 1
    [line] = err.getvalue().splitlines()
    assert line.startswith("error: ") and not_mlflow_url in line and "MLFLOW_TRACKING_URI" in line


@pytest.mark.parametrize(
    "source", ["models:/seed@champion", "models:/seed/3", "models:/seed/latest", f"models:/m-{'0' * 32}"]
)
def test_a_registry_uri_against_a_closed_tracking_port_is_a_storage_error_not_a_missing_version(
    closed_url: str, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # "No such version or alias: check the name" would send them to the Models page of a server that is down.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_url)
    result = CliRunner().invoke(main, ["show", source, "--json"])
    assert result.exit_code == 1, result.output
    printed = json.loads(result.stdout)
    assert printed["type"] == "StorageError", printed
    assert source in printed["error"] and closed_url in printed["error"] and "retry" in printed["error"]
    assert "no such registered model" not in printed["error"]


def test_temporary_credentials_sign_every_request_with_their_session_token(
    mocked_s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SSO, an assumed role and CI's OIDC all export three variables: the key alone is refused by AWS S3
    # (InvalidAccessKeyId) without the token issued with it, at the first checkpoint's upload.
    from tracking.storage.s3 import S3Store
    from tracking.storage.s3_client import s3_client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMPORARY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temporary-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-of-the-session")
    s3_client.cache_clear()
    try:
        config = TrackingConfig.from_env()
        assert "token-of-the-session" not in repr(config)
        store = S3Store("s3://unit-artifacts/exp/run/artifacts", config, owner="run r1")
        tokens: list[object] = []
        # First in line: moto answers the request at this same event, once it is signed.
        store.client.meta.events.register_first(
            "before-send.s3", lambda request, **_: tokens.append(request.headers.get("X-Amz-Security-Token"))
        )
        store.write_bytes("checkpoint.pt", b"weights")
        assert bytes(store.read("checkpoint.pt")) == b"weights"
    finally:
        s3_client.cache_clear()
    assert tokens == [b"token-of-the-session"] * 2


@pytest.mark.parametrize(
    ("style", "url"),
    [(None, "https://s3.amazonaws.com/unit-artifacts/"), ("virtual", "https://unit-artifacts.s3.amazonaws.com/")],
)
def test_the_addressing_style_mlflows_s3_client_is_set_to_is_the_one_checkpoints_use(
    mocked_s3: object, monkeypatch: pytest.MonkeyPatch, style: str | None, url: str
) -> None:
    # A store that serves buckets only as <bucket>.<host>: MLflow's own uploads (the whole model) followed the
    # variable, the checkpoints' were sent path-style regardless, and failed.
    from tracking.storage.s3 import S3Store
    from tracking.storage.s3_client import s3_client

    if style is not None:
        monkeypatch.setenv("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE", style)
    s3_client.cache_clear()
    try:
        store = S3Store("s3://unit-artifacts/exp/run/artifacts", TrackingConfig.from_env(), owner="run r1")
        urls: list[str] = []
        store.client.meta.events.register_first("before-send.s3", lambda request, **_: urls.append(request.url))
        store.write_bytes("checkpoint.pt", b"weights")
        assert bytes(store.read("checkpoint.pt")) == b"weights"
    finally:
        s3_client.cache_clear()
    assert [u[: len(url)] for u in urls] == [url] * 2


def test_an_addressing_style_botocore_would_refuse_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE='virtual-hosted'"):
        TrackingConfig.from_env({"MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "virtual-hosted"})
