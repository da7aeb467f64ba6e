"""Releases the tracking stores MLflow keeps for the life of the process, so each test's go with it.

MLflow caches, per process and without a bound that matters here:

- one SQLAlchemy engine per database URI, in class-level ``_engine_map`` dicts of the tracking,
  model-registry and jobs SqlAlchemyStores (never evicted): each holds the pool, an open file
  handle to that test's ``mlflow.db`` and the store's mapped metadata;
- the store objects themselves, in ``lru_cache(maxsize=100)`` on the tracking and registry
  store registries, keyed by resolved URI;
- artifact repositories by run ID (up to 1,024), and S3 clients by endpoint (up to 64), made
  from boto3's default session, which keeps the first credentials it read.

The library adds one: the runs its writers opened (``tracking.run._opened``, by config, tracking
URI and run ID), each holding its artifact store, whose S3 client holds a botocore loader with
the parsed service model (~7 MB, ~10,000 dicts): kept, it was most of what stayed after the
engines were released (2.9 GB at the unit tier's end, and as long a garbage collection at exit).

A suite that gives every test a fresh sqlite store in its ``tmp_path`` kept all of them: about
500 engines, 7 GB resident, and minutes of garbage collection at interpreter exit. Releasing is
safe at any time: a later call for the same URI builds the store again (an engine someone still
holds keeps working after ``dispose``: it opens a new connection when next used).
"""

from __future__ import annotations

import sys


def release_mlflow_stores() -> int:
    """Drops MLflow's (and the library's) cached stores, runs and repositories, disposes the engines; returns how many.

    A no-op when mlflow was never imported (nothing cached; and importing it would cost seconds).
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
    # from the environment: kept, a test against a stack got the keys an earlier test gave moto.
    s3_artifact_repo._cached_get_s3_client.cache_clear()
    boto3 = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None

    disposed = 0
    for store_class in (TrackingSqlStore, RegistrySqlStore, SqlAlchemyJobStore):
        with store_class._engine_map_lock:
            engines = list(store_class._engine_map.values())
            store_class._engine_map.clear()
        for engine in engines:
            engine.dispose()
            disposed += 1
    return disposed
