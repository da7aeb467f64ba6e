"""The MLflow run an operation targets: the active run or an explicit run ID, and its store."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from tracking.config import TrackingConfig, bound_mlflow_requests
from tracking.errors import NotFoundError, StorageError, one_line
from tracking.storage import ArtifactStore, open_store
from tracking.uri import RUN_ID_SHAPE, looks_issued


@dataclass
class RunHandle:
    """A run's ID, tags and artifact store, fetched once per operation."""

    run_id: str
    experiment_id: str
    tags: dict[str, str]
    store: ArtifactStore
    client: Any
    config: TrackingConfig

    def set_tags(self, tags: dict[str, str], metrics: Sequence[Any] = ()) -> None:
        """Set run tags (and log ``metrics``, MLflow ``Metric`` entities) in one request."""
        from mlflow.entities import RunTag

        if not tags and not metrics:
            return
        # One request for all: the latest/best pointers move together, with the checkpoint's metrics.
        with tracking_server_errors(self.run_id, "setting the run's tags"):
            self.client.log_batch(self.run_id, metrics=list(metrics), tags=[RunTag(k, v) for k, v in tags.items()])
        self.tags.update(tags)

    def refresh_tags(self) -> None:
        """Re-read the run's tags from the tracking server (another writer may have moved them)."""
        with tracking_server_errors(self.run_id, "reading the run's tags"):
            self.tags = dict(self.client.get_run(self.run_id).data.tags)


@contextmanager
def tracking_server_errors(run_id: str, doing: str) -> Iterator[None]:
    """Turn a failing or unreachable tracking server into a StorageError that says what to do."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        deleted = _DELETED.search(str(exc))
        if deleted is not None:
            # Deleted since this process opened the run (in the UI, by another user): no retry helps.
            if deleted["kind"] == "run":
                what, restore = "", f"the MLflow UI or with `mlflow runs restore --run-id {run_id}`"
            else:
                what = f"'s experiment (ID {deleted['id']})"
                restore = f"the MLflow UI or with `mlflow experiments restore --experiment-id {deleted['id']}`"
            raise NotFoundError(
                f"run {run_id}{what} is deleted (found while {doing}); restore it in {restore} and retry, "
                "or log to another run."
            ) from exc
        raise StorageError(
            f"run {run_id}: the tracking server failed while {doing} ({one_line(exc)[:500]}); "
            "check that it runs and MLFLOW_TRACKING_URI points at it, then retry."
        ) from exc


# MLflow's refusal to write to a deleted run or to a run of a deleted experiment.
_DELETED = re.compile(
    r"The (?P<kind>run|experiment) (?P<id>\S+) must be in the 'active' state\. Current state is deleted"
)


def target_run_id(run_id: str | None) -> str:
    """``run_id`` when given, else the active run's; a clear error when there is neither."""
    if run_id is not None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        return run_id
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise ValueError(
            "no active MLflow run and no run_id: call inside `with mlflow.start_run():` or pass run_id=..."
        )
    return str(active.info.run_id)


def open_run(run_id: str, config: TrackingConfig | None = None, *, reuse: bool = False) -> RunHandle:
    """Fetch run ``run_id`` (one tracking-server call) and open its artifact store.

    ``reuse=True`` (for writers, which re-read the tags when they commit) returns the run as
    opened before in this process, with empty tags, without asking the server again: a run's
    artifact location never changes, and a save of a small model is mostly such requests.
    """
    import mlflow

    bound_mlflow_requests()
    config = config or TrackingConfig.from_env()
    key = (config, config.tracking_uri or mlflow.get_tracking_uri(), run_id)
    opened = _opened.pop(key, None) if reuse else None
    if opened is None:
        opened = _fetch_run(run_id, config)
    _opened[key] = opened  # the most recently opened last
    while len(_opened) > _OPENED_KEPT:
        del _opened[next(iter(_opened))]
    return replace(opened, tags=dict(opened.tags) if not reuse else {})


# Runs opened in this process, by (config, tracking URI, run ID), oldest first: see
# open_run(reuse=True). Each holds a client and an S3 store, so a process that opens run after
# run (an evaluation service loading many) keeps only the last few.
_OPENED_KEPT = 16
_opened: dict[tuple[TrackingConfig, str, str], RunHandle] = {}


def _fetch_run(run_id: str, config: TrackingConfig) -> RunHandle:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"} or "not found" in str(exc):
            # An ID of another shape is more likely a typo or a name than a run of another server's.
            shape = "" if looks_issued(run_id) else f"; an MLflow server's run IDs are {RUN_ID_SHAPE}"
            raise NotFoundError(
                f"run {run_id} not found on tracking server {client.tracking_uri}; check the run ID "
                f"(in the MLflow UI{shape}) and MLFLOW_TRACKING_URI."
            ) from exc
        raise StorageError(
            f"run {run_id}: the tracking server {client.tracking_uri} failed while reading the run "
            f"({one_line(exc)[:500]}); check that it runs and MLFLOW_TRACKING_URI points at it "
            "(`tracking stack status` for the local stack), then retry."
        ) from exc
    except OSError as exc:
        raise StorageError(
            f"run {run_id}: cannot reach the tracking server {client.tracking_uri} ({exc}); "
            "check MLFLOW_TRACKING_URI (`tracking stack status`)."
        ) from exc
    if run.info.lifecycle_stage == "deleted":
        raise NotFoundError(f"{deleted_run_advice(client, run_id, run.info.experiment_id)}, to use its artifacts.")
    store = open_store(run.info.artifact_uri, config, owner=f"run {run_id}")
    return RunHandle(run_id, run.info.experiment_id, dict(run.data.tags), store, client, config)


def deleted_run_advice(client: Any, run_id: str, experiment_id: str) -> str:
    """Why run ``run_id`` (deleted) cannot be used, and what to restore, without a closing period: MLflow marks
    the runs of a deleted experiment deleted too, and refuses to restore such a run while its experiment stays
    deleted, so the advice names the experiment then."""
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment(experiment_id)
    except (MlflowException, OSError):
        experiment = None  # the run's own state is all there is to tell
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        return (
            f"run {run_id} is in experiment {experiment.name!r} (ID {experiment_id}), which is deleted, and its runs "
            "with it; restore the experiment in the MLflow UI or with `mlflow experiments restore --experiment-id "
            f"{experiment_id}`"
        )
    return f"run {run_id} is deleted; restore it in the MLflow UI or with `mlflow runs restore --run-id {run_id}`"
