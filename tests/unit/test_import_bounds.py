"""``import tracking`` bounds MLflow's requests: the user's own MLflow calls before any library call included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.unit.test_timeouts import SilentServer
from tracking.config import MLFLOW_REQUEST_DEFAULTS

pytestmark = pytest.mark.unit

# The user's script: import the library, then call MLflow itself (a read, which MLflow retries) before calling
# the library.
_SCRIPT = """
import json, os, sys, time
import tracking
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
start = time.monotonic()
try:
    mlflow.get_run("0" * 32)
except Exception as exc:
    failed = type(exc).__name__
else:
    failed = None
print(json.dumps({"seconds": time.monotonic() - start, "failed": failed,
                  "env": {var: os.environ.get(var) for var in json.loads(sys.argv[2])}}))
"""


@pytest.fixture
def silent_url() -> Iterator[str]:
    server = SilentServer()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def _env(**user: str) -> dict[str, str]:
    """This process's environment without MLflow's request settings or a tracking URI, plus ``user``'s."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in MLFLOW_REQUEST_DEFAULTS and not name.startswith(("MLFLOW_TRACKING_", "MLFLOW_EXPERIMENT_"))
    }
    return {**env, **user}


def test_the_users_own_mlflow_call_before_any_library_call_is_bounded_once_tracking_is_imported(
    silent_url: str,
) -> None:
    # A short timeout of the user's own (the unit tier waits out no real one); retries and backoff left unset.
    # (A write such as mlflow.start_run() is tried once: the library's 8 s instead of MLflow's 120 s bounds it.)
    env = _env(MLFLOW_HTTP_REQUEST_TIMEOUT="1", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0")
    names = json.dumps(sorted(MLFLOW_REQUEST_DEFAULTS))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, silent_url, names], env=env, capture_output=True, text=True, timeout=45
        )
    except subprocess.TimeoutExpired:
        # Was: MLflow's own 7 retries with backoff factor 2 (sleeps of 4, 8, 16, 32... s): minutes of a silent server.
        pytest.fail("mlflow.get_run() against a silent server was still waiting after 45 s")
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said["failed"] is not None, said
    # 3 attempts x 1 s, backoff sleeps 0 + 2 s: 5 s.
    assert said["seconds"] < 15, said
    assert said["env"] == {
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "1",
    }, said


def test_importing_tracking_keeps_what_the_user_set_and_imports_neither_mlflow_nor_torch() -> None:
    probe = (
        "import json, os, sys, tracking; "
        "print(json.dumps([{v: os.environ.get(v) for v in json.loads(sys.argv[1])}, "
        "'mlflow' in sys.modules, 'torch' in sys.modules]))"
    )
    env = _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="7", MLFLOW_HTTP_REQUEST_TIMEOUT="")
    names = json.dumps(sorted(MLFLOW_REQUEST_DEFAULTS))
    done = subprocess.run([sys.executable, "-c", probe, names], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    settings, mlflow_imported, torch_imported = json.loads(done.stdout)
    # An empty value counts as unset, as everywhere in the library.
    assert settings == {
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
    }
    assert (mlflow_imported, torch_imported) == (False, False)
