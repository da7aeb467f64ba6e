"""Integration tier: real SeaweedFS + ``mlflow server`` (+ the machine's PostgreSQL).

Session stacks start lazily, on free ports in a temporary folder, and are stopped at the end of
the session even when tests fail. A stack that cannot start fails the tests that need it: a
missing service is a failure here, never a skip (in CI and locally alike).
"""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tracking.config import TrackingConfig
from tracking.errors import TrackingError
from tracking.localstack import SEAWEEDFS_PORT_COUNT, LocalStack

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
POSTGRES_URI = "postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"

_handed_out: set[int] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


def free_ports() -> tuple[int, int]:
    """An S3 port with the SeaweedFS block after it free, and a free MLflow port right after that."""
    for _ in range(200):
        # Below the kernel's ephemeral range (32768+), so outgoing connections do not take them.
        base = random.randrange(20000, 32000 - SEAWEEDFS_PORT_COUNT - 1)
        block = range(base, base + SEAWEEDFS_PORT_COUNT + 1)
        if _handed_out.isdisjoint(block) and all(_bindable(port) for port in block):
            _handed_out.update(block)
            return base, base + SEAWEEDFS_PORT_COUNT
    raise RuntimeError("no block of free ports found in 20000-32000")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_stack(data_dir: Path, backend_store_uri: str | None = None, serve_artifacts: bool = False) -> LocalStack:
    """A stack on free ports with the built-in local credentials (never the caller's AWS_* ones)."""
    s3_port, mlflow_port = free_ports()
    return LocalStack(
        TrackingConfig(),
        data_dir,
        s3_port=s3_port,
        mlflow_port=mlflow_port,
        backend_store_uri=backend_store_uri,
        serve_artifacts=serve_artifacts,
    )


def _run_stack(stack: LocalStack, what: str) -> Iterator[LocalStack]:
    try:
        try:
            stack.up()
        except TrackingError as exc:
            pytest.fail(f"the {what} stack could not start: {exc}", pytrace=False)
        yield stack
    finally:
        stack.down()


# The session stacks (stack_sqlite, stack_postgres, stack_proxied, postgres_database) are defined in
# tests/conftest.py: one of each for the whole session, shared by every tier that uses them.


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Creates a fresh database on the machine's PostgreSQL, yields its name, and drops it afterwards.

    Fails the test (never skips it) when PostgreSQL cannot be reached.
    """
    import psycopg2

    name = f"tracking_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(POSTGRES_ADMIN_DSN, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable ({exc}); start it first", pytrace=False)
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def new_stack(tmp_path: Path) -> Iterator[Callable[..., LocalStack]]:
    """Makes (unstarted) stacks on free ports in this test's tmp_path; all are stopped afterwards.

    Also the way to clean up after a CLI test: the CLI finds the processes by the data folder.
    """
    made: list[LocalStack] = []

    def new(name: str = "stack", backend_store_uri: str | None = None, serve_artifacts: bool = False) -> LocalStack:
        made.append(make_stack(tmp_path / name, backend_store_uri, serve_artifacts))
        return made[-1]

    try:
        yield new
    finally:
        for stack in made:
            stack.down()


@pytest.fixture
def use_stack(monkeypatch: pytest.MonkeyPatch) -> Callable[[LocalStack], LocalStack]:
    """Point MLflow and S3 clients in this test at a stack (undone after the test)."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    def use(stack: LocalStack) -> LocalStack:
        for key, value in stack.env().items():
            monkeypatch.setenv(key, value)
        # An explicit mlflow.set_tracking_uri() elsewhere would win over the variable.
        monkeypatch.setattr(tracking_utils, "_tracking_uri", stack.tracking_uri)
        return stack

    return use


@pytest.fixture(params=["sqlite", "postgres", "proxied"])
def stack(request: pytest.FixtureRequest, use_stack: Callable[[LocalStack], LocalStack]) -> LocalStack:
    """Each session stack in turn, with this test's clients pointed at it."""
    return use_stack(request.getfixturevalue(f"stack_{request.param}"))


@pytest.fixture
def s3_keys() -> Callable[[LocalStack, str], list[str]]:
    """Lists the object keys under a prefix of a stack's bucket, with boto3 (not through MLflow)."""

    def keys(stack: LocalStack, prefix: str = "") -> list[str]:
        pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    return keys
