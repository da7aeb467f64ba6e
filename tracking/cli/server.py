"""Which tracking server a command talks to: MLFLOW_TRACKING_URI, else the local stack if it runs.

Without either, MLflow would quietly create ``mlflow.db`` in the working folder and find no
run there; a command fails with a line that says how to start a stack or what to export.
"""

from __future__ import annotations

import os
import sys

import click

from tracking.config import bound_mlflow_requests, check_client_env
from tracking.errors import ConfigError, StorageError, TrackingError, one_line

_announced = False


def connect() -> None:
    """Make sure MLflow talks to a real tracking server; say once when that is the local stack.

    Also refuses malformed client settings (``AWS_MAX_ATTEMPTS=abc``) in one line, before
    MLflow or botocore trip over them in the middle of a request.
    """
    global _announced
    check_client_env()
    # A command's own MLflow calls (listing runs, reading an experiment) come before any library
    # call that would bound them: without this, a closed tracking port takes MLflow's minutes.
    bound_mlflow_requests()
    # A command prints one line per outcome; MLflow draws a tqdm bar on stderr for every artifact it
    # downloads whenever tqdm is installed (lightning and transformers install it). Set to true to see them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    from tracking.config import TrackingConfig
    from tracking.localstack import records, services

    stack = records.locate(TrackingConfig.from_env())
    if (stack.data_dir / "run" / "stack.json").exists() and services.mlflow_problem(stack.tracking_uri) is None:
        for name, value in stack.env().items():
            os.environ.setdefault(name, value)
        if not _announced and _first_process():
            click.echo(f"using the local stack at {stack.tracking_uri} (MLFLOW_TRACKING_URI is not set)", err=True)
        _announced = True
        return
    raise ConfigError(
        "MLFLOW_TRACKING_URI is not set and no local stack runs: start one with `tracking stack up`, "
        "or export MLFLOW_TRACKING_URI=http://<your server> (and the S3 variables)."
    )


def _first_process() -> bool:
    """False in every process of a torchrun job but rank 0: the job says things once."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK"))


def mlflow_failure(exc: BaseException) -> TrackingError | None:
    """``exc`` as one of ours when it is MLflow's own error (a refused or failed request), else None.

    Read from ``sys.modules``: an MLflow error can only come from a command that imported MLflow.
    """
    errors = sys.modules.get("mlflow.exceptions")
    if errors is None or not isinstance(exc, errors.MlflowException):
        return None
    message = one_line(exc)
    if not message.startswith("API request to"):
        return TrackingError(message)  # the server answered: an unknown run, a bad argument
    # The request itself failed: nothing listens there, or what answers is no MLflow server (S3, a proxy).
    import mlflow

    return StorageError(
        f"the tracking server at {mlflow.get_tracking_uri()} failed ({message[:300]}); check that it runs "
        "and that MLFLOW_TRACKING_URI points at an MLflow server (e.g. http://127.0.0.1:5000), then retry."
    )
