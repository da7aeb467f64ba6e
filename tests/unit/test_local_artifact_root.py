"""An experiment rooted on a local path behind a tracking server on another host: warned once per root."""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

import tracking
from pipelines.models import Model
from tracking.config import TrackingConfig
from tracking.storage import local_root, open_store

pytestmark = pytest.mark.unit

REMOTE = "http://mlflow.example.com:5000"


@pytest.fixture(autouse=True)
def _nothing_warned_yet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(local_root, "_warned", set())
    local_root._is_this_machine.cache_clear()
    yield
    local_root._is_this_machine.cache_clear()


def _opened(artifact_uri: str, tracking_uri: str, owner: str = "run r1") -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_store(artifact_uri, TrackingConfig(tracking_uri=tracking_uri), owner=owner)
    return [str(w.message) for w in caught if "artifact root" in str(w.message)]


def test_a_checkpoint_logged_to_a_local_root_of_a_remote_server_is_warned_about_naming_run_root_and_fix(
    tracking_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "srv-mlruns"
    experiment_id = mlflow.create_experiment("local-root", artifact_location=str(root))
    mlflow.set_experiment(experiment_id=experiment_id)
    # The sqlite store stands in for a server on another host.
    monkeypatch.setattr(local_root, "is_remote_server", lambda uri: uri == tracking_store)
    model = Model(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run() as run:
        warnings.simplefilter("always")
        tracking.log_checkpoint(model, optimizer, epoch=0)
        tracking.log_checkpoint(model, optimizer, epoch=1)
    said = [str(w.message) for w in caught if "artifact root" in str(w.message)]
    assert len(said) == 1, said  # once for the root, not per checkpoint or logged model
    assert run.info.run_id in said[0]
    assert f"artifact root {root} is" in said[0]
    assert tracking_store in said[0]
    for fix in ("--serve-artifacts", "--artifacts-destination", "s3://", "NFS"):
        assert fix in said[0]
    assert tracking.load(run.info.run_id).epoch == 1  # warned, not refused


def test_each_local_root_is_warned_about_once() -> None:
    first = _opened("file:///srv/mlruns/1/aaa/artifacts", REMOTE, "run aaa")
    again = _opened("file:///srv/mlruns/1/bbb/artifacts", REMOTE, "run bbb")
    model = _opened("file:///srv/mlruns/1/models/m-123/artifacts", REMOTE, "run bbb, m-123")
    other = _opened("/srv/mlruns/2/ccc/artifacts", REMOTE, "run ccc")
    assert len(first) == 1 and "run aaa" in first[0] and "file:///srv/mlruns/1 " in first[0]
    assert again == [] and model == []
    assert len(other) == 1 and "/srv/mlruns/2 " in other[0]


def test_the_warning_shows_no_credentials_of_the_tracking_uri() -> None:
    said = _opened("/srv/mlruns/1/aaa/artifacts", "https://alice:s3cret@mlflow.example.com/mlflow?token=t0k")
    assert len(said) == 1 and "https://mlflow.example.com/mlflow runs" in said[0], said
    assert "s3cret" not in said[0] and "alice" not in said[0] and "t0k" not in said[0]


@pytest.mark.parametrize(
    "tracking_uri",
    [
        "http://localhost:5000",
        "http://127.0.0.1:5000",
        "http://127.0.1.1:5000",
        "http://[::1]:5000",
        "http://0.0.0.0:5000",
        f"http://{socket.gethostname()}:5000",
        "sqlite:///tmp/mlflow.db",
        "/tmp/mlruns",
        "databricks",
    ],
)
def test_a_server_on_this_machine_or_no_server_is_not_warned_about(tracking_uri: str) -> None:
    assert _opened("file:///srv/mlruns/1/aaa/artifacts", tracking_uri) == []


@pytest.mark.parametrize("artifact_uri", ["mlflow-artifacts:/1/aaa/artifacts", "s3://bucket/1/aaa/artifacts"])
def test_a_root_the_server_serves_or_on_s3_is_not_warned_about(
    artifact_uri: str, tracking_s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")  # mlflow-artifacts:/ needs a server
    assert _opened(artifact_uri, "https://mlflow.example.com") == []


@pytest.mark.parametrize("tracking_uri", [REMOTE, "https://10.1.2.3", "HTTPS://MLflow.Example.com/"])
def test_remote_servers_are_told_apart_from_this_machine(tracking_uri: str) -> None:
    assert local_root.is_remote_server(tracking_uri)


def _own_address() -> str:
    """An address of this machine's own that is not a loopback one: the one it would send from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # a datagram socket sends nothing on connect: it picks a route
        return str(probe.getsockname()[0])


def _resolving(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> list[str]:
    """Host names in ``names`` resolve to their address (as a DNS server or /etc/hosts would); the names looked up."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return real(names.get(host, host), port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_server_reached_through_an_address_or_name_of_this_machine_is_not_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was warned: an address that is not a loopback one, a name that is not this machine's host name.
    own = _own_address()
    looked_up = _resolving(monkeypatch, {"mlflow.box.internal": own, "mlflow.other.internal": "198.51.100.7"})
    assert _opened("file:///srv/mlruns/1/aaa/artifacts", f"http://{own}:5000") == []
    assert _opened("file:///srv/mlruns/1/aaa/artifacts", "http://mlflow.box.internal:5000") == []
    assert not local_root.is_remote_server("https://MLflow.Box.Internal./")
    assert looked_up.count("mlflow.box.internal") == 1, looked_up  # resolved once per process
    assert local_root.is_remote_server("http://mlflow.other.internal:5000")


def test_a_host_name_that_does_not_resolve_in_time_is_taken_for_another_host_without_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer = threading.Event()

    def silent_resolver(*args: Any, **kwargs: Any) -> Any:
        answer.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", silent_resolver)
    monkeypatch.setattr(local_root, "RESOLVE_TIMEOUT_S", 0.05)
    started = time.monotonic()
    try:
        said = _opened("file:///srv/mlruns/1/aaa/artifacts", "http://mlflow.silent.internal:5000")
        assert time.monotonic() - started < 5
    finally:
        answer.set()
    assert len(said) == 1, said  # warned, as for any other host
