"""tracking.testing's fixtures let each test's tracking store go when the test ends.

MLflow caches a SQLAlchemy engine per database URI (and the store per URI) for the life of the
process: a suite that gives every test a fresh sqlite store kept ~500 of them open, 7 GB resident,
and spent minutes collecting garbage at exit. This runs a small session of tests, each with its
own ``tracking_store``, in a child pytest with ``tracking.testing`` as its only plugin (as a user's suite
enables it, without this suite's conftests), and checks in its
last test that nothing of the earlier stores is left: no engine, no open ``mlflow.db``, no run the
library's writers opened (each holds an S3 client and its parsed service model).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SESSION = """
import os

import mlflow
import pytest
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from tracking import run as runs


@pytest.mark.parametrize("n", range(3))
def test_a_store_of_its_own(tracking_store: str, tmp_path, n: int) -> None:
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment(f"e{n}", artifact_location=(tmp_path / "artifacts").as_uri())
    runs.open_run(client.create_run(experiment_id).info.run_id, reuse=True)  # as writers open runs
    client.search_registered_models()  # the registry store has engines of its own
    assert any(uri.endswith("mlflow.db") for uri in SqlAlchemyStore._engine_map) and runs._opened


def test_nothing_is_left_of_them() -> None:
    fds = "/proc/self/fd"
    held = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds) if os.path.exists(f"{fds}/{fd}")]
    assert [path for path in held if path.endswith("mlflow.db")] == []
    assert list(SqlAlchemyStore._engine_map) == [] and list(RegistryStore._engine_map) == []
    assert runs._opened == {}, "runs opened by earlier tests (each holding its store and S3 client)"
"""


def test_each_tests_tracking_store_is_released_when_it_ends(tmp_path: Path) -> None:
    (tmp_path / "test_session.py").write_text(SESSION)
    plugins = ["-p", "no:cacheprovider", "-p", "tracking.testing"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugins, "--rootdir", str(tmp_path), str(tmp_path / "test_session.py")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout
