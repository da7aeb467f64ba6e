"""Promise: "Credentials come from the standard variables (``AWS_*``, ``MLFLOW_*``) and never reach params,
tags, artifacts or log lines" (nor error messages or command output).

A stack of its own, whose S3 server accepts only a real-looking key pair (``AKIA`` + 16, and 40
random characters), and a tracking password in ``MLFLOW_TRACKING_PASSWORD``. With them: save
(multipart) and load in-process with every logger at DEBUG; ``tracking checkpoints``, ``show``
and ``verify``; errors from a dead endpoint and a wrong secret, in-process, on the command line
and with ``--debug``; a training pipeline. Then every param and tag of every run and experiment,
every object in the bucket, the tracking server's database and both servers' logs, every log
record and every line printed are searched for the secrets.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import string
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import tracking
from tests.integration.conftest import free_ports
from tests.reliability import workload
from tracking.config import TrackingConfig
from tracking.errors import TrackingError
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
LOGGERS = ("", "tracking", "pipelines", "mlflow", "botocore", "boto3", "urllib3", "s3transfer")


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


ACCESS_KEY_ID = "AKIA" + _random(string.ascii_uppercase + string.digits, 16)
SECRET_ACCESS_KEY = _random(string.ascii_letters + string.digits + "/+", 40)
WRONG_SECRET = _random(string.ascii_letters + string.digits + "/+", 40)
TRACKING_PASSWORD = _random(string.ascii_letters + string.digits, 32)


@pytest.fixture(scope="module")
def secret_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = TrackingConfig(aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)
    s3_port, mlflow_port = free_ports()
    data_dir = tmp_path_factory.mktemp("stack-secrets")
    stack = LocalStack(config, data_dir, s3_port=s3_port, mlflow_port=mlflow_port, stop_timeout=5.0)
    assert not stack.uses_local_credentials
    try:
        try:
            stack.up()
        except TrackingError as exc:
            pytest.fail(f"the stack with custom credentials could not start: {exc}", pytrace=False)
        yield stack
    finally:
        stack.down()


def _dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_credentials_reach_no_param_tag_artifact_log_or_output(
    secret_stack: LocalStack,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow import MlflowClient

    from tracking.audit import verify
    from tracking.storage.s3_client import s3_client

    stack = secret_stack
    experiment = f"reliability-secrets-{uuid.uuid4().hex[:8]}"
    env = {
        **stack.env(),
        "MLFLOW_TRACKING_USERNAME": "reliability",
        "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD,
        "TRACKING_S3_PART_SIZE_MB": "5",
        "TRACKING_EXPERIMENT": experiment,
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET_ACCESS_KEY
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", stack.tracking_uri)
    s3_client.cache_clear()
    texts: list[tuple[str, str]] = []  # (where it was found, text)

    # Every logger at DEBUG, including those that do not propagate to the root (MLflow's).
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
        if name:
            logging.getLogger(name).addHandler(caplog.handler)
    try:
        caplog.handler.setLevel(logging.DEBUG)
        experiment_id = mlflow.create_experiment(experiment)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            model, optimizer = workload.state(1)
            tracking.log_checkpoint(model, optimizer, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")
            tracking.log_state_dict(model)
        run_id = run.info.run_id
        assert tracking.load(run_id).epoch == 1
        assert [m.epoch for m in tracking.list_checkpoints(run_id)] == [1]
        assert all(problem is None for problem in verify(run_id).values())
        texts.append(("TrackingConfig repr", repr(TrackingConfig.from_env())))

        for what, override in (
            ("dead endpoint", {"MLFLOW_S3_ENDPOINT_URL": _dead_endpoint()}),
            ("wrong secret", {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
        ):
            with monkeypatch.context() as patch:
                for key, value in override.items():
                    patch.setenv(key, value)
                s3_client.cache_clear()
                with pytest.raises(TrackingError) as raised:
                    verify(run_id)
                texts.append((f"error in-process ({what})", _error_text(raised.value)))
            s3_client.cache_clear()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
            if name:
                logging.getLogger(name).removeHandler(caplog.handler)
    texts += [(f"log record {r.name}:{r.levelname}", r.getMessage()) for r in caplog.records]
    # The capture works (else "no leak in the logs" would prove nothing): boto3's DEBUG lines are in it.
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in caplog.records)
    printed = capfd.readouterr()
    texts += [("stdout in-process", printed.out), ("stderr in-process", printed.err)]

    def cli(*args: str, **override: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "tracking", *args],
            cwd=ROOT,
            env={**os.environ, **override},
            capture_output=True,
            text=True,
            timeout=120,
        )
        texts.append((f"`tracking {' '.join(args)}` {override or ''}", done.stdout + done.stderr))
        return done

    for command in (["checkpoints", run_id], ["show", run_id], ["verify", run_id]):
        assert cli(*command).returncode == 0, texts[-1][1][-2000:]
    for flags in ([], ["--debug"]):
        assert cli(*flags, "verify", run_id, MLFLOW_S3_ENDPOINT_URL=_dead_endpoint()).returncode != 0
        assert cli(*flags, "verify", run_id, AWS_SECRET_ACCESS_KEY=WRONG_SECRET).returncode != 0
    trained = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--epochs", "2"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    texts.append(("pipelines.train output", trained.stdout + trained.stderr))
    assert trained.returncode == 0, trained.stderr[-2000:]

    # What the tracking server stores: experiments, runs (params, tags, descriptions), logged models.
    client = MlflowClient(stack.tracking_uri)
    experiments = client.search_experiments()
    for exp in experiments:
        texts.append((f"experiment {exp.name}", f"{exp.name} {exp.artifact_location} {exp.tags}"))
    experiment_ids = [exp.experiment_id for exp in experiments]
    runs = client.search_runs(experiment_ids)
    assert len(runs) >= 2
    for found in runs:
        texts.append((f"run {found.info.run_id} params", repr(found.data.params)))
        texts.append((f"run {found.info.run_id} tags", repr(found.data.tags)))
        texts.append((f"run {found.info.run_id} info", repr(found.info)))
    for logged in client.search_logged_models(experiment_ids):
        texts.append((f"logged model {logged.model_id}", repr(logged.params) + repr(logged.tags)))
    # Every object in the bucket, whoever wrote it.
    s3 = stack.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(key.endswith("checkpoint.pt") for key in keys)
    artifacts = {key: s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() for key in keys}
    # The servers' own records: the backend store and both logs.
    files = [stack.data_dir / "mlflow.db", stack.log_path("mlflow"), stack.log_path("seaweedfs")]

    leaks = []
    for name, secret in (
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
        ("the wrong secret", WRONG_SECRET),
        ("MLFLOW_TRACKING_PASSWORD", TRACKING_PASSWORD),
    ):
        leaks += [f"{name} in {where}" for where, text in texts if secret in text]
        leaks += [f"{name} in object {key}" for key, data in artifacts.items() if secret.encode() in data]
        leaks += [f"{name} in {path}" for path in files if path.exists() and secret.encode() in path.read_bytes()]
    # The key ID is no secret to botocore's DEBUG log (it signs every request with it), but it is
    # still a credential: it must not be recorded in params, tags, artifacts or printed output.
    printed_or_stored = [(where, text) for where, text in texts if not where.startswith("log record")]
    leaks += [f"AWS_ACCESS_KEY_ID in {where}" for where, text in printed_or_stored if ACCESS_KEY_ID in text]
    leaks += [f"AWS_ACCESS_KEY_ID in object {key}" for key, data in artifacts.items() if ACCESS_KEY_ID.encode() in data]
    assert not leaks, "credentials leaked:\n" + "\n".join(leaks)
