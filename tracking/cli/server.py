"""Which tracking server a command talks to: MLFLOW_TRACKING_URI, else the local stack if it runs.

Without either, MLflow would quietly create ``mlflow.db`` in the working folder and find no
run there; a command fails with a line that says how to start a stack or what to export.
"""

from __future__ import annotations

import os

import click

from tracking.errors import ConfigError

_announced = False


def connect() -> None:
    """Make sure MLflow talks to a real tracking server; say once when that is the local stack."""
    global _announced
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    from tracking.config import TrackingConfig
    from tracking.localstack import LocalStack, services
    from tracking.localstack.settings import StackSettings

    settings = StackSettings.from_env()
    stack = LocalStack.from_data_dir(TrackingConfig.from_env(), settings.data_dir, bucket=settings.bucket)
    if (stack.data_dir / "run" / "stack.json").exists() and services.mlflow_problem(stack.tracking_uri) is None:
        for name, value in stack.env().items():
            os.environ.setdefault(name, value)
        if not _announced:
            click.echo(f"using the local stack at {stack.tracking_uri} (MLFLOW_TRACKING_URI is not set)", err=True)
            _announced = True
        return
    raise ConfigError(
        "MLFLOW_TRACKING_URI is not set and no local stack runs here: start one with `tracking stack up`, "
        "or export MLFLOW_TRACKING_URI=http://<your server> (and the S3 variables)."
    )
