"""docker/compose.yaml's MLflow server, run natively: the command and environment the file declares.

The compose host names point at this machine: ``postgres`` at its PostgreSQL (a fresh database),
``minio`` at a real S3 server (the session's SeaweedFS, standing in for MinIO, with a fresh bucket
as minio-init would create) and ``mlflow`` at a free port. Everything else is the file's own text,
interpolated the way Compose does with what a ``docker/.env`` would hold here. A checkpoint is then
logged, listed and loaded with the trainer service's environment, so the compose file cannot drift
from a configuration that works: once as declared (clients write to the bucket) and once with the
one-line change its comment offers (the server proxies artifacts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.tracking._tracking_service.utils as tracking_utils
import psycopg2
import pytest
import torch

import tracking
from pipelines.models import Model
from tests import compose
from tests.integration.conftest import POSTGRES_ADMIN_DSN, free_ports, fresh_postgres_database
from tracking.localstack import LocalStack
from tracking.localstack.services import mlflow_problem
from tracking.localstack.supervisor import Supervisor
from tracking.storage.s3_client import s3_client

pytestmark = pytest.mark.integration

SERVER = "mlflow"
TRAINER = "trainer"
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Server:
    """The declared server, running: where it listens, what it stores to, and how its clients are set up."""

    tracking_uri: str
    bucket: str
    database: str
    client_env: dict[str, str]
    log: Path


def map_endpoints(value: str, endpoints: Mapping[str, str]) -> str:
    """``value`` with the host:port of every URL in it moved from the compose network to this machine.

    A URL naming a compose host this test does not map fails the test: the file grew a dependency
    that is not proven here.
    """

    def move(match: re.Match[str]) -> str:
        scheme, userinfo, hostport = match.groups()
        host = hostport.split(":")[0]
        if hostport in endpoints:
            return f"{scheme}{userinfo or ''}{endpoints[hostport]}"
        if host in {address.split(":")[0] for address in endpoints}:
            pytest.fail(f"{compose.COMPOSE_FILE} uses {hostport} in {value!r}, which this test does not map")
        return match.group()

    return re.sub(r"([a-z0-9+.-]+://)([^/@\s]*@)?([A-Za-z0-9.-]+(?::\d+)?)", move, value)


def set_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with the value of ``option`` (given once, as ``--opt value`` or ``--opt=value``) replaced."""
    at = [i for i, arg in enumerate(argv) if arg == option or arg.startswith(f"{option}=")]
    assert len(at) == 1, f"expected {option} once in {argv}"
    i = at[0]
    if argv[i] == option:
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv[:i], f"{option}={value}", *argv[i + 1 :]]


def option(argv: list[str], name: str) -> str:
    i = argv.index(name)
    return argv[i + 1]


def http_get(url: str, host: str | None = None) -> tuple[int, bytes]:
    headers = {"Host": host} if host else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_until_healthy(supervisor: Supervisor, tracking_uri: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (problem := mlflow_problem(tracking_uri)) is not None:
        exit_code = supervisor.exit_code(SERVER)
        if exit_code is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            how = f"exited with {exit_code}" if exit_code is not None else f"not healthy in {STARTUP_TIMEOUT:.0f}s"
            pytest.fail(f"the declared mlflow server {how} ({problem}); log {log}:\n{tail}", pytrace=False)
        time.sleep(0.5)


@pytest.fixture(params=["declared", "proxied"])
def server(
    request: pytest.FixtureRequest, stack_sqlite: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """The compose file's mlflow service (as declared, or with its proxied-artifacts line), running here."""
    text = compose.read_text() if request.param == "declared" else compose.proxied_artifacts_variant()
    s3 = stack_sqlite
    bucket = f"compose-{uuid.uuid4().hex[:10]}"
    s3.s3_client().create_bucket(Bucket=bucket)  # minio-init's job
    _, port = free_ports()
    with fresh_postgres_database() as database:
        # What docker/.env would hold on this machine; the rest are the file's own defaults.
        settings = {
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "not-checked-by-trust-auth",
            "POSTGRES_DB": database,
            "MINIO_ROOT_USER": s3.access_key_id,
            "MINIO_ROOT_PASSWORD": s3.secret_access_key,
            "TRACKING_BUCKET": bucket,
        }
        services = compose.load(settings, text=text)["services"]
        endpoints = {
            "postgres:5432": "127.0.0.1:5432",
            "minio:9000": f"127.0.0.1:{s3.s3_port}",
            "mlflow:5000": f"127.0.0.1:{port}",
        }
        declared = compose.command(services[SERVER])
        assert declared[:2] == ["mlflow", "server"], declared
        assert option(declared, "--port") == "5000" and option(declared, "--host") == "0.0.0.0"
        argv = [sys.executable, "-m", "mlflow", *declared[1:]]  # the image's `mlflow` entry point
        argv = set_option(argv, "--host", "127.0.0.1")  # 0.0.0.0 inside its container
        argv = set_option(argv, "--port", str(port))
        argv = [map_endpoints(arg, endpoints) for arg in argv]
        declared_env = compose.environment(services[SERVER], settings)
        # Like a container: nothing from this shell's MLFLOW_* / AWS_* reaches the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update({key: map_endpoints(value, endpoints) for key, value in declared_env.items()})

        tracking_uri = f"http://127.0.0.1:{port}"
        log = tmp_path / "mlflow.log"
        supervisor = Supervisor(tmp_path, cwd=tmp_path)
        supervisor.spawn(SERVER, argv, env, log)
        try:
            _wait_until_healthy(supervisor, tracking_uri, log)
            healthcheck = services[SERVER]["healthcheck"]["test"]
            assert healthcheck[:2] == ["CMD", "python"], healthcheck
            probe = [sys.executable, *(a.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for a in healthcheck[2:])]
            assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0, "the healthcheck fails"

            client_env = {
                key: map_endpoints(value, endpoints)
                for key, value in compose.environment(services[TRAINER], settings).items()
            }
            assert client_env["MLFLOW_TRACKING_URI"] == tracking_uri
            if request.param == "proxied":
                # The comment promises that proxied clients need no S3 keys: they get none here.
                client_env = {k: v for k, v in client_env.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
            for key in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
                monkeypatch.delenv(key)
            for key, value in client_env.items():
                monkeypatch.setenv(key, value)
            monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_uri)
            s3_client.cache_clear()
            yield Server(tracking_uri, bucket, database, client_env, log)
        finally:
            s3_client.cache_clear()
            supervisor.stop([SERVER], timeout=15)


def _trained(seed: int) -> tuple[Model, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Model(n_input_features=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(8, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_declared_server_logs_lists_and_loads_a_checkpoint(
    server: Server, stack_sqlite: LocalStack, request: pytest.FixtureRequest
) -> None:
    # Allowed hosts: the trainers' Host header and a browser's on the machine, and nothing else.
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
        status, body = request_to(server, search, host=host)
        assert status == 200, (host, body[:300])
    assert request_to(server, search, host="rebinding.example:5000")[0] == 403

    proxied = request.node.callspec.params["server"] == "proxied"
    experiment_id = mlflow.create_experiment(f"compose-{uuid.uuid4().hex[:8]}")
    location = mlflow.get_experiment(experiment_id).artifact_location
    if proxied:
        assert location.startswith("mlflow-artifacts:"), location
    else:
        assert location == f"s3://{server.bucket}/mlartifacts/{experiment_id}", location

    model, optimizer = _trained(seed=1)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, metrics={"val_loss": 0.5})
        model, optimizer = _trained(seed=2)
        tracking.log_checkpoint(model, optimizer, epoch=2, metrics={"val_loss": 0.4})
    run_id = run.info.run_id

    listed = tracking.list_checkpoints(run_id)
    assert [checkpoint.epoch for checkpoint in listed] == [1, 2]
    loaded = tracking.load(run_id)
    assert loaded.epoch == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.optimizer is not None
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(loaded.optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)

    # The bytes are in the bucket (written by the client, or by the proxying server)...
    latest = listed[-1]
    pages = stack_sqlite.s3_client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    marker = latest.model_id or run_id
    assert any(marker in key and key.endswith("checkpoint.pt") for key in keys), keys
    # ... and the server reads them back with its own S3 settings, as its UI does.
    if latest.model_id:
        path = f"/ajax-api/2.0/mlflow/logged-models/{latest.model_id}/artifacts/files?artifact_file_path=manifest.json"
    else:
        path = f"/get-artifact?run_uuid={run_id}&path={latest.path}/manifest.json"
    status, body = request_to(server, path, host="mlflow:5000")
    assert status == 200, body[:500]
    assert json.loads(body)["epoch"] == 2

    # The run is in the PostgreSQL database the file's backend store URL names.
    conn = psycopg2.connect(POSTGRES_ADMIN_DSN.replace("dbname=postgres", f"dbname={server.database}"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run_id,))
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None and row[0] == 1


def request_to(server: Server, path: str, host: str) -> tuple[int, bytes]:
    return http_get(f"{server.tracking_uri}{path}", host=host)
