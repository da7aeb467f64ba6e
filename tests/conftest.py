"""Checks shared by every tier."""

from __future__ import annotations

import sys
from collections.abc import Generator

import pytest


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
