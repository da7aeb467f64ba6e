"""Checks shared by every tier."""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tracking.localstack import LocalStack

# One intra-op thread in every test process and in every process a test starts, set before anything imports
# torch. The tests compare trainings across processes bit for bit (a straight run against a killed and resumed
# one), and with several threads torch's CPU matrix products (MKL) do not always repeat their last bits from
# one process to the next on a loaded machine. On two cores it also keeps two pytest workers from
# oversubscribing them. torchrun gives its ranks one thread already.
os.environ["OMP_NUM_THREADS"] = "1"

# tracking_s3, tracking_store, tracking_experiment: the fixtures the library offers its users' tests.
pytest_plugins = ["tracking.testing"]

UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the unit tier ``unit`` (not its ``slow`` tests); keeps ``smoke(**params)`` only on the params it names.

    ``make test`` runs ``-m "unit or smoke"``: the unit tier plus one real-stack path per promise.
    ``@pytest.mark.smoke(stack="sqlite")`` on a test parametrised over stacks picks its sqlite case.
    """
    for item in items:
        # A unit test marked slow (a second case of a promise a faster one proves, or a benchmark's own check)
        # is left to make test-all.
        if UNIT in item.path.parents and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
        marks = list(item.iter_markers("smoke"))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if marks and not any(all(params.get(k) == v for k, v in m.kwargs.items()) for m in marks):
            # -m reads the markers of the item and its parents; smoke(...) sits on the function.
            item.own_markers[:] = [m for m in item.own_markers if m.name != "smoke"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Leave what collection made (torch, mlflow, transformers, lightning imported: about a million objects, alive
    for the whole session) out of every later garbage collection.

    The Hugging Face Trainer runs a full collection at each ``train()`` (accelerate's ``clear_device_cache``), and
    Python one now and then: each walked them all, 0.5 s a time, 21 s of test_transformers.py's 59. What a test
    makes is collected as before.
    """
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Spare the interpreter's shutdown its garbage collections: pytest has printed its summary.

    Shutdown runs full collections over every object still alive (about a million: torch, mlflow,
    transformers and what the tests left), seconds of work whose only result is memory the
    operating system takes back anyway. Frozen objects are left out of every collection.
    """
    gc.freeze()


@pytest.fixture(autouse=True)
def _release_mlflow_stores() -> Iterator[None]:
    """Lets each test's tracking stores (sqlite engines, open mlflow.db handles) go when it ends.

    MLflow caches them for the life of the process (see tracking.testing.release_mlflow_stores): kept, a suite of
    per-test stores grew to 7 GB and took minutes to exit.
    """
    yield
    # Imported here, not at the top: pytest imports the plugin first (pytest_plugins below), as it rewrites plugins.
    from tracking.testing import release_mlflow_stores

    release_mlflow_stores()


# The signal handlers the test process started with. A test may leave one changed (Lightning ignores SIGINT once it
# has caught a Ctrl-C), and every process a later test starts inherits an ignored signal: a command that Ctrl-C
# should stop would then run on.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SIGNAL_HANDLERS_AT_START = {number: signal.getsignal(number) for number in _SIGNALS}


@pytest.fixture(autouse=True)
def _put_back_signal_handlers() -> Iterator[None]:
    """After each test, the handlers of SIGINT, SIGTERM, SIGHUP and SIGQUIT are the process's own again.

    Put back to those the process started with rather than those the test found: a module-scoped fixture runs
    before any test's own fixtures, and what it changed would otherwise outlive the module.
    """
    yield
    for number, handler in SIGNAL_HANDLERS_AT_START.items():
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


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


# The real stacks, one of each per session whichever tiers use them (integration, reliability,
# distributed): each start costs a SeaweedFS and an MLflow server. Defined here, at the root, so
# that every tier resolves the same fixture; imported lazily, so the unit tier never loads them.


@pytest.fixture(scope="session")
def stack_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """sqlite backend store; clients write artifacts to S3 themselves."""
    from tests.integration.conftest import _run_stack, make_stack

    yield from _run_stack(make_stack(tmp_path_factory.mktemp("stack-sqlite")), "sqlite")


@pytest.fixture(scope="session")
def stack_proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """sqlite backend store; the server proxies artifacts (``--serve-artifacts``)."""
    from tests.integration.conftest import _run_stack, make_stack

    yield from _run_stack(make_stack(tmp_path_factory.mktemp("stack-proxied"), serve_artifacts=True), "proxied")


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped at the end of the session."""
    from tests.integration.conftest import POSTGRES_URI, fresh_postgres_database

    with fresh_postgres_database() as name:
        yield POSTGRES_URI.format(name=name)


@pytest.fixture(scope="session")
def stack_postgres(tmp_path_factory: pytest.TempPathFactory, postgres_database: str) -> Iterator[LocalStack]:
    """PostgreSQL backend store; clients write artifacts to S3 themselves."""
    from tests.integration.conftest import _run_stack, make_stack

    stack = make_stack(tmp_path_factory.mktemp("stack-postgres"), backend_store_uri=postgres_database)
    yield from _run_stack(stack, "postgres")
