"""Reliability tier: DESIGN.md's "Reliability promises", proved against the real local stack.

Reuses the integration tier's stacks (SeaweedFS + ``mlflow server`` on PostgreSQL, started once
per session on free ports of 127.0.0.1, shared with that tier) and puts :class:`~tests.reliability.proxy.FaultProxy`
in front of them. Every test here is marked ``reliability`` (and ``integration``: it needs the
real stack); a stack that cannot start fails the tests, never skips them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The integration tier's fixtures, shared rather than copied (a non-root conftest cannot use
# pytest_plugins). Only fixtures are imported: that conftest's own hooks stay its own. The session
# stacks (stack_postgres, stack_sqlite) come from tests/conftest.py: the same ones as that tier's.
from tests.integration.conftest import (  # noqa: F401
    new_stack,
    s3_keys,
    use_stack,
)
from tests.reliability.proxy import FaultProxy
from tracking.localstack import LocalStack

MARKER = "reliability"  # registered in pyproject.toml


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(getattr(pytest.mark, MARKER))
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def stack(stack_postgres: LocalStack, use_stack: Callable[[LocalStack], LocalStack]) -> LocalStack:  # noqa: F811
    """The PostgreSQL stack, with this test's clients pointed straight at it."""
    from tracking.storage.s3_client import s3_client

    s3_client.cache_clear()
    return use_stack(stack_postgres)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MB parts: a checkpoint of a few MB is a multipart upload of several parts, read in several ranges."""
    monkeypatch.setenv("TRACKING_S3_PART_SIZE_MB", "5")


@pytest.fixture
def experiment_id(stack: LocalStack) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(stack.tracking_uri).create_experiment(f"reliability-{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def new_run(stack: LocalStack, experiment_id: str) -> Callable[[], str]:
    """Creates runs (not made active: every call here passes run_id=) in this test's experiment."""
    from mlflow import MlflowClient

    def make() -> str:
        return str(MlflowClient(stack.tracking_uri).create_run(experiment_id).info.run_id)

    return make


class Route:
    """Points this test's clients at proxies in front of the stack, or straight at it again."""

    def __init__(self, stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stack = stack
        self.monkeypatch = monkeypatch
        self.s3 = FaultProxy(stack.s3_port, "s3")
        self.tracking = FaultProxy(stack.mlflow_port, "mlflow")

    def through_proxies(self) -> None:
        self._point(self.s3.url, self.tracking.url)

    def direct(self) -> None:
        self._point(self.stack.s3_endpoint_url, self.stack.tracking_uri)

    def _point(self, s3_url: str, tracking_uri: str) -> None:
        import mlflow.tracking._tracking_service.utils as tracking_utils

        from tracking.storage.s3_client import s3_client

        self.monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_url)
        self.monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        # An explicit tracking URI in MLflow's fluent state wins over the variable.
        self.monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_uri)
        s3_client.cache_clear()

    def close(self) -> None:
        self.s3.close()
        self.tracking.close()


@pytest.fixture
def route(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Route]:
    """Fault proxies in front of the stack's S3 and tracking servers; clients go through them."""
    routing = Route(stack, monkeypatch)
    routing.through_proxies()
    try:
        yield routing
    finally:
        routing.direct()
        routing.close()
