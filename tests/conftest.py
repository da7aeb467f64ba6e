"""Checks shared by every tier."""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep `tracking stack up`'s per-user records ($XDG_STATE_HOME) out of the real home folder.

    Subprocesses inherit it; a test that checks the records points it at its own tmp_path.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Fail a test that leaves an MLflow run active (it would become the next test's parent run).

    A hook around the test body rather than a fixture: it runs before any fixture teardown, so
    the tracking URI the run lives on is still set when the run is ended here.
    """
    try:
        yield
    except BaseException:
        _end_leaked_runs()  # the test's own failure is the one worth reporting
        raise
    leaked = _end_leaked_runs()
    if leaked:
        pytest.fail(
            f"{item.nodeid} left MLflow run(s) {', '.join(leaked)} active; "
            "use `with mlflow.start_run():` or call mlflow.end_run()",
            pytrace=False,
        )


def _end_leaked_runs() -> list[str]:
    mlflow = sys.modules.get("mlflow")  # not imported: no run can be active, and no import cost
    if mlflow is None:
        return []
    leaked = []
    while (run := mlflow.active_run()) is not None:
        leaked.append(run.info.run_id)
        try:
            mlflow.end_run(status="KILLED")
        except Exception:
            pass  # end_run pops the run before it calls the server, which may be gone by now
    return leaked
