"""pytest fixtures for testing training code that logs to MLflow and S3, with no server and no network.

Enable them in a ``conftest.py`` (they need ``moto[s3]`` and ``pytest``: ``pip install
"torch-mlflow-tracking[testing]"``)::

    pytest_plugins = ["tracking.testing"]

- ``tracking_s3``: moto's in-process S3 (``moto.mock_aws``) holding one empty bucket, with fake
  credentials in the environment; the bucket's name. Override the ``tracking_s3_bucket`` fixture to name it
  (a name AWS S3 refuses fails the setup: moto takes it).
- ``tracking_store``: a fresh sqlite tracking store in the test's ``tmp_path``, made the current
  tracking URI (``MLFLOW_TRACKING_URI`` and ``mlflow.set_tracking_uri``) and registry; its URI. Experiments
  made without an artifact location keep their files in ``tmp_path / "mlruns"``, not the working directory.
- ``tracking_experiment``: both, and an active experiment whose artifacts go to that bucket; its ID.
  ``tracking.log_checkpoint``, ``Checkpointer`` and ``tracking.load`` then run as they do against a real
  server and S3, in a second or two per test; so does the ``tracking`` command line (``TRACKING_EXPERIMENT``
  names that experiment).
- ``tracking_s3_server``: instead of ``tracking_s3``, the same bucket served by moto over HTTP on 127.0.0.1,
  with its endpoint and the fake credentials exported, for training code the test runs as a child process;
  ``tracking_experiment`` then keeps its artifacts there.

Each test is isolated from the shell and from the tests before it: the fixtures hide the variables and AWS
config files that would send requests elsewhere (an endpoint, a profile, a registry, an experiment or run
ID), undo ``mlflow.set_experiment`` and ``mlflow.set_registry_uri``, end the runs a test left open (FAILED
when the test failed, FINISHED otherwise), and wait for its background checkpoint saves (``blocking=False``,
``Checkpointer(async_save=True)``) before moto goes: a save still running lands in its own test's bucket,
and a failed one fails that test's teardown. In every test, fixtures or not, MLflow's autologging is put back as
it was before it (``mlflow.autolog()``, ``mlflow.<flavor>.autolog()``): on, off or configured as the session's
conftest.py left it.

A new sqlite store runs MLflow's ~100 schema migrations (2-3 s): the fixtures migrate one once per
session and give each test a copy. MLflow caches every store it opens for the life of the process
(an engine with an open file, the store, S3 clients made with the credentials it first read): after
each test that used a store, :func:`release_mlflow_stores` lets them go, so a suite of many such tests
stays small and each test's credentials are its own.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import urllib.request
from collections.abc import Generator, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tracking.autologging import autologging_configs, restore_autologging

# The variables that would send the library's S3 requests, or MLflow's, anywhere but moto.
_S3_ELSEWHERE = (
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
)
# Where botocore reads a profile: the default one may name an endpoint_url (a MinIO or a real bucket's).
_AWS_FILES = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
# The variables that would send MLflow's writes to another registry, or into an experiment or run of the
# shell's, rather than the test's store: mlflow.set_experiment and set_registry_uri set them too.
_MLFLOW_ELSEWHERE = ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
# Set on a test whose setup or body failed (pytest_runtest_makereport): its open runs end FAILED.
_TEST_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def tracking_s3_bucket() -> str:
    """The name of the bucket ``tracking_s3`` creates; override it to choose another."""
    return "tracking-test"


@pytest.fixture
def tracking_s3(tracking_s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's in-process S3 with an empty bucket ``tracking_s3_bucket``, for this test only; the bucket's name."""
    import boto3
    from moto import mock_aws

    from tracking.storage.s3_client import boto3_session

    _use_fake_aws(monkeypatch, tracking_s3_bucket)
    with mock_aws():
        # boto3's default session keeps the profile it read when made (the user's code may have made it): a new
        # one reads the fake credentials, for the user's boto3.client("s3") and MLflow's. (mock_aws puts the old
        # one back when it ends.)
        boto3.DEFAULT_SESSION = boto3_session()
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=tracking_s3_bucket)
        try:
            yield tracking_s3_bucket
        finally:
            _let_s3_go()  # while moto still answers: after it, a save still running would go to AWS


@pytest.fixture(scope="session")
def tracking_moto_server() -> Iterator[str]:
    """moto's S3 served over HTTP on 127.0.0.1 (a free port) for the whole session; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def tracking_s3_server(
    tracking_s3_bucket: str, tracking_moto_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    """``tracking_s3`` served over HTTP, so child processes of the test reach it too; the bucket's name.

    ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` and the fake credentials are exported: training code
    the test runs as a subprocess (``python train.py``, ``torchrun``) logs to this bucket, and with
    ``tracking_store`` into its store (``MLFLOW_TRACKING_URI``).
    """
    import boto3

    from tracking.storage.s3_client import boto3_session

    if "tracking_s3" in request.fixturenames:
        pytest.fail(
            f"{request.node.nodeid} asks for both tracking_s3 (moto in this process) and tracking_s3_server "
            "(moto over HTTP, for child processes): ask for one; tracking_s3_server serves this process too.",
            pytrace=False,
        )
    _use_fake_aws(monkeypatch, tracking_s3_bucket)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", boto3_session())  # as in tracking_s3
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", tracking_moto_server)  # the library's and MLflow's S3 clients
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", tracking_moto_server)  # a plain boto3.client("s3") of the user's
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=tracking_s3_bucket)
    try:
        yield tracking_s3_bucket
    finally:
        try:
            _let_s3_go()
        finally:
            # Every bucket and object goes: the next test starts from an empty S3, as with tracking_s3.
            urllib.request.urlopen(urllib.request.Request(f"{tracking_moto_server}/moto-api/reset", method="POST"))


def _use_fake_aws(monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    """Refuse a bucket name AWS refuses; hide what would send S3 requests elsewhere; set fake credentials."""
    from tracking.storage.s3_client import s3_client
    from tracking.uri import bucket_name_problem

    problem = bucket_name_problem(bucket)
    if problem is not None:  # moto takes it: the suite would pass and the same code fail against AWS
        pytest.fail(
            f"tracking_s3_bucket is {bucket!r}, a name real S3 refuses: {problem}. Your code would pass its "
            "tests on moto and fail against S3; override the tracking_s3_bucket fixture with a name such as "
            "'my-bucket'.",
            pytrace=False,
        )
    for var in _S3_ELSEWHERE:
        monkeypatch.delenv(var, raising=False)
    for var in _AWS_FILES:
        monkeypatch.setenv(var, os.devnull)
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_client.cache_clear()  # a client made before would go to the real endpoint


def _let_s3_go() -> None:
    """Wait for the test's background saves, then drop the S3 clients made with moto's credentials and endpoint."""
    from tracking.storage.s3_client import s3_client

    try:
        _flush_background_saves()
    finally:
        s3_client.cache_clear()
        release_mlflow_stores()  # MLflow's S3 clients


@pytest.fixture(scope="session")
def tracking_empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite tracking store with MLflow's schema and nothing else, migrated once per session."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("tracking-empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema and experiment 0
    release_mlflow_stores()  # closes the engine: the file is complete and nothing holds it
    return path


@pytest.fixture
def tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking_empty_store: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh sqlite tracking store in ``tmp_path``, the current tracking URI for this test; its URI."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    shutil.copyfile(tracking_empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = _keep_artifacts_in(tmp_path / "mlruns", tmp_path / "mlflow.db")
    for var in _MLFLOW_ELSEWHERE:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # The registry follows the tracking URI once no registry URI is set; an experiment set by an earlier
    # test (or this one) would be looked up in the next test's store, where it does not exist.
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    # MLflow roots a sqlite store's experiments at ./mlruns of the working directory: the user's
    # checkout, where each test would write into the same mlruns/<id>/ as the tests before it.
    tracking_utils._get_store(uri).artifact_root_uri = artifacts
    yield uri
    try:
        _flush_background_saves()  # they write the run's tags: into this store, not the next test's
    finally:
        # A run left open would be ended in the next test's store; FAILED tells a failed test's run apart.
        status = "FAILED" if request.node.stash.get(_TEST_FAILED, False) else "FINISHED"
        while mlflow.active_run() is not None:
            mlflow.end_run(status)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # back to the environment's: MLflow takes None
        release_mlflow_stores()


@pytest.fixture
def tracking_experiment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An active experiment, ``tracking-test``, whose runs store their artifacts in ``tracking_s3``; its ID.

    Its bucket is ``tracking_s3_server``'s when the test asks for that one.
    """
    import mlflow

    served = "tracking_s3_server" in request.fixturenames
    bucket = request.getfixturevalue("tracking_s3_server" if served else "tracking_s3")
    request.getfixturevalue("tracking_store")  # after S3: its teardown ends the runs before S3 goes
    experiment_id = mlflow.create_experiment("tracking-test", artifact_location=f"s3://{bucket}/tracking-test")
    mlflow.set_experiment(experiment_id=experiment_id)  # also MLFLOW_EXPERIMENT_ID, for child processes
    monkeypatch.setenv("TRACKING_EXPERIMENT", "tracking-test")  # the experiment `tracking runs` lists
    return str(experiment_id)


@pytest.fixture(autouse=True)
def _tracking_experiment_as_before() -> Iterator[None]:
    """Put MLflow's active experiment back as it was before the test, whether or not the test used the fixtures.

    ``mlflow.set_experiment`` also exports ``MLFLOW_EXPERIMENT_ID``: left, the next test (which may talk to
    another store, where that ID names another experiment or none) and every process it starts would inherit it.
    """
    exported = os.environ.get("MLFLOW_EXPERIMENT_ID")
    fluent = sys.modules.get("mlflow.tracking.fluent")  # not imported: no experiment is set, and no import cost
    active = getattr(fluent, "_active_experiment_id", None)
    yield
    if exported is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = exported
    if (fluent := sys.modules.get("mlflow.tracking.fluent")) is not None:
        setattr(fluent, "_active_experiment_id", active)  # noqa: B010  MLflow keeps it private


@pytest.fixture(autouse=True)
def _tracking_autologging_as_before(request: pytest.FixtureRequest) -> Iterator[None]:
    """Put MLflow's autologging back as it was before the test, whether or not the test used the fixtures.

    ``mlflow.autolog()`` or ``mlflow.<flavor>.autolog()`` in one test would otherwise stay on for every later
    test of the session, logging params, metrics and models they never asked for. Only what the test turned
    on, off or reconfigured is undone: autologging the session enabled before (in a conftest.py) stays.
    """
    before = autologging_configs()
    yield
    problems = restore_autologging(before, request.node.nodeid)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note on the test whether its setup or body failed: the runs it left open then end FAILED."""
    report: pytest.TestReport = yield
    raised_as_expected = report.skipped and hasattr(report, "wasxfail")  # an xfail test's body raised
    if report.when in ("setup", "call") and (report.failed or raised_as_expected):
        item.stash[_TEST_FAILED] = True
    return report


def _keep_artifacts_in(root: Path, database: Path) -> str:
    """Root the default experiment of the store at ``database`` in ``root``; ``root`` as MLflow writes it."""
    with closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(root / "0"),))
    return str(root)


def _flush_background_saves() -> None:
    """Wait for the background checkpoint saves still running; fail the test's teardown when one failed.

    Left running, a save would outlive the test's moto (its requests then going to AWS) and its failure
    would surface in a later test, or only when the process exits.
    """
    saver = sys.modules.get("tracking.saver")
    if saver is None:
        return
    try:
        saver.wait_for_checkpoints()
    except Exception as exc:
        pytest.fail(
            f"a background checkpoint save of this test failed: {type(exc).__name__}: {exc}\n"
            "The fixtures waited for it at teardown; call tracking.wait_for_checkpoints() (or close the "
            "Checkpointer) before the test ends to see the failure in the test itself.",
            pytrace=False,
        )


def release_mlflow_stores() -> int:
    """Let go of the stores MLflow (and the library) cache for the life of the process; returns the engines closed.

    MLflow keeps, without a bound that matters in a test suite: one SQLAlchemy engine per database URI
    (each with a pool and an open handle on that ``mlflow.db``) in the SqlAlchemyStores' class-level
    ``_engine_map``, never evicted; the store objects, in ``lru_cache(maxsize=100)`` by URI; artifact
    repositories by run ID; and S3 clients by endpoint, made from boto3's default session, which keeps the
    credentials it first read. The library keeps the runs its writers opened (``tracking.run._opened``),
    each with its artifact store and S3 client (a botocore service model of ~7 MB). A suite giving each
    test a fresh store kept all of them: about 500 engines, 7 GB resident, and minutes of garbage
    collection at exit. Safe at any time: a later call for the same URI builds the store again (an
    engine still held keeps working after ``dispose``: it opens a new connection when next used).
    A no-op when mlflow was never imported (nothing cached; importing it would cost seconds).
    """
    run_module = sys.modules.get("tracking.run")
    if run_module is not None:
        run_module._opened.clear()
    if "mlflow" not in sys.modules:
        return 0
    from mlflow.store.artifact import s3_artifact_repo
    from mlflow.store.jobs.sqlalchemy_store import SqlAlchemyJobStore
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSqlStore
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    registry = registry_utils._model_registry_store_registry
    if registry is not None:
        registry._get_store_with_resolved_uri.cache_clear()
    tracking_utils._artifact_repos_cache.clear()
    # S3 clients by endpoint, made from boto3's default session, which keeps the credentials it first read
    # from the environment: kept, a test against a real S3 got the keys an earlier test gave moto.
    s3_artifact_repo._cached_get_s3_client.cache_clear()
    boto3 = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None  # type: ignore[attr-defined]  # made again from the environment

    disposed = 0
    for store_class in (TrackingSqlStore, RegistrySqlStore, SqlAlchemyJobStore):
        with store_class._engine_map_lock:
            engines = list(store_class._engine_map.values())
            store_class._engine_map.clear()
        for engine in engines:
            engine.dispose()
            disposed += 1
    return disposed
