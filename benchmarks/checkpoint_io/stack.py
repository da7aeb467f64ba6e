"""The stack the benchmark measures against: its endpoint, this process pointed at it, and its space reclaimed."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SeaweedFS frees deleted bytes only when a volume is vacuumed: do it once this much is deleted.
VACUUM_EVERY_BYTES = 1 << 30


@dataclass(frozen=True)
class Endpoint:
    """Where the benchmark sends its bytes, and how to reclaim them on SeaweedFS."""

    env: dict[str, str]
    master_url: str | None
    started: bool

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def s3_endpoint_url(self) -> str:
        return self.env["MLFLOW_S3_ENDPOINT_URL"]

    def boto3_client(self, **options: Any) -> Any:
        """A boto3 S3 client with the endpoint's credentials; ``options`` go to ``boto3.client``."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.env.get("AWS_SECRET_ACCESS_KEY"),
            region_name=self.env.get("AWS_DEFAULT_REGION", "us-east-1"),
            **options,
        )


@contextmanager
def bench_stack(
    *, use_env: bool, master_url: str | None, data_dir: Path, s3_port: int, mlflow_port: int
) -> Iterator[Endpoint]:
    """The stack to measure against; stops it afterwards only if it was started here."""
    if use_env:
        env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))}
        missing = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} - set(env)
        if missing:
            raise SystemExit(f"--use-env needs {', '.join(sorted(missing))} set (e.g. from `tracking stack up`)")
        yield Endpoint(env, master_url, started=False)
        return
    import tracking
    from tracking.localstack import LocalStack

    # TrackingConfig() rather than from_env(): the bench stack uses its built-in local
    # credentials, never whatever AWS_* the calling shell holds.
    stack = LocalStack(tracking.TrackingConfig(), data_dir, s3_port=s3_port, mlflow_port=mlflow_port)
    started = stack.up()
    try:
        yield Endpoint(stack.env(), stack.master_url, started=bool(started))
    finally:
        if started:
            stack.down()


@contextmanager
def client_env(endpoint: Endpoint) -> Iterator[None]:
    """Point tracking, MLflow and boto3 in this process at the endpoint (undone afterwards)."""
    import mlflow

    # MLflow prints a "View run" link for every run ended; the tables are the output here.
    env = {**endpoint.env, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mlflow.set_tracking_uri(endpoint.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the variable
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Reclaimer:
    """Deletes objects as soon as they are measured, and vacuums SeaweedFS now and then.

    A large checkpoint left on disk, or deleted but not yet vacuumed, would fill the disk
    within a few rounds and slow every later write; so each measurement cleans up after itself.
    """

    def __init__(self, client: Any, master_url: str | None) -> None:
        self.client = client
        self.master_url = master_url
        self.pending = 0
        self.vacuums = 0

    def delete(self, bucket: str, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=bucket, Key=obj["Key"])
                self.pending += int(obj["Size"])

    def maybe_vacuum(self, force: bool = False) -> None:
        if self.master_url is None or not (force or self.pending >= VACUUM_EVERY_BYTES):
            return
        # Synchronous on the master: it returns once the volumes are compacted.
        url = f"{self.master_url}/vol/vacuum?garbageThreshold=0.0001"
        with urllib.request.urlopen(url, timeout=600) as response:
            response.read()
        self.pending = 0
        self.vacuums += 1
