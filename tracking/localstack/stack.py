"""The local stack: SeaweedFS (an S3 server) and an MLflow tracking server, as background processes.

Development and tests only: the library never imports this package (the CLI loads it lazily).

Everything lives under one data folder (default ``.tracking/``, or ``$TRACKING_DATA_DIR`` from the CLI)::

    seaweedfs/            SeaweedFS volumes and filer metadata (the bucket's objects)
    mlflow.db             the MLflow backend store, unless a database URL is given
    logs/<service>.log    each service's output, appended across restarts
    run/<service>.pid     the pid we started, with run/<service>.cmdline to recognise it later
                          (kept by :class:`~tracking.localstack.supervisor.Supervisor`)
    run/s3.json           SeaweedFS identities (the S3 credentials)
    run/stack.json        the settings of the last ``up``, read by ``down`` and ``status``
    stack.env             ``export ...`` lines for shells and Makefiles

What the two services are (ports, command lines, health probes) is in
:mod:`tracking.localstack.services`; this module starts them together, waits for them (through
:mod:`tracking.localstack.health`) and records how it did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracking.config import TrackingConfig
from tracking.errors import TrackingError
from tracking.localstack import services
from tracking.localstack.datadir import export_lines, tree_size, write_private
from tracking.localstack.health import wait_until_healthy
from tracking.localstack.services import HOST as HOST  # re-exported: imported from here
from tracking.localstack.services import MLFLOW, SEAWEEDFS, Launch, WeedNotFound, redact
from tracking.localstack.services import SEAWEEDFS_PORT_COUNT as SEAWEEDFS_PORT_COUNT
from tracking.localstack.settings import DEFAULT_BUCKET, DEFAULT_DATA_DIR, StackSettings
from tracking.localstack.status import ServiceStatus, StackStatus
from tracking.localstack.supervisor import SpawnError, StillRunning, Supervisor, port_free

DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
# Used when AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set: the store only listens on
# 127.0.0.1, so fixed, printed defaults are convenient and not a secret worth hiding.
LOCAL_ACCESS_KEY_ID = "tracking-local"
LOCAL_SECRET_ACCESS_KEY = "tracking-local-secret"
ARTIFACT_PREFIX = "mlartifacts"

_SERVICES = (SEAWEEDFS, MLFLOW)


class StackError(TrackingError):
    """The local stack could not be started, stopped or inspected."""


def _unreadable_settings(state: Path, exc: Exception, processes: Supervisor) -> str:
    """What to do about a damaged ``run/stack.json``: it holds the ports and backend store of the stack's last
    ``up``, so deleting it while that stack runs would leave servers that no command knows the ports of."""
    running = [f"{name} pid {pid}" for name in _SERVICES if (pid := processes.owned_pid(name)) is not None]
    data_dir = state.parent.parent
    if running:
        return (
            f"cannot read {state} ({exc!r}), the settings of the stack that still runs in {data_dir} "
            f"({', '.join(running)}, found by their pid files in {processes.run_dir}); keep the file until it is "
            f"stopped: run `tracking stack down --data-dir {data_dir}`, which needs only the pid files, then delete "
            f"{state} and run `tracking stack up` again (with the --backend-store-uri it used, if any)"
        )
    return (
        f"cannot read {state} ({exc!r}); no process of the stack in {data_dir} runs (its pid files in "
        f"{processes.run_dir} name none), so nothing needs it: delete it and run `tracking stack up` again (with "
        "the --backend-store-uri it used, if any; its data stays in the folder)"
    )


class LocalStack:
    """SeaweedFS + ``mlflow server`` on 127.0.0.1, with their state in ``data_dir``.

    ``config`` supplies the S3 credentials and region (none: the built-in local credentials).
    ``data_dir`` and ``bucket`` default to ``.tracking`` and ``mlflow``; the environment is not
    read here (:meth:`StackSettings.from_env` does that for the CLI). ``backend_store_uri``
    defaults to a sqlite file in ``data_dir``. With ``serve_artifacts`` the server proxies
    artifacts (clients need no S3 credentials); otherwise clients write to
    ``s3://<bucket>/mlartifacts`` themselves.
    """

    def __init__(
        self,
        config: TrackingConfig | None = None,
        data_dir: Path | str | None = None,
        s3_port: int = DEFAULT_S3_PORT,
        mlflow_port: int = DEFAULT_MLFLOW_PORT,
        backend_store_uri: str | None = None,
        serve_artifacts: bool = False,
        startup_timeout: float = 90.0,
        stop_timeout: float = 15.0,
        bucket: str | None = None,
    ) -> None:
        self.config = config if config is not None else TrackingConfig()
        settings = StackSettings(
            bucket=bucket if bucket is not None else DEFAULT_BUCKET,
            data_dir=Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR,
        )
        self.data_dir = settings.data_dir.resolve()
        self._bucket = settings.bucket
        if not 1 <= s3_port <= 65536 - SEAWEEDFS_PORT_COUNT:
            raise ValueError(f"s3_port={s3_port}: needs {SEAWEEDFS_PORT_COUNT} ports from it below 65536")
        if not 1 <= mlflow_port <= 65535:
            raise ValueError(f"mlflow_port={mlflow_port} is not a TCP port")
        if s3_port <= mlflow_port < s3_port + SEAWEEDFS_PORT_COUNT:
            raise ValueError(
                f"mlflow_port={mlflow_port} falls inside SeaweedFS's ports {s3_port}-"
                f"{s3_port + SEAWEEDFS_PORT_COUNT - 1}"
            )
        self._s3_port = s3_port
        self._mlflow_port = mlflow_port
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"
        self.serve_artifacts = serve_artifacts
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._processes = Supervisor(self.data_dir / "run", cwd=self.data_dir)
        self._client: Any = None

    @classmethod
    def from_data_dir(
        cls,
        config: TrackingConfig | None = None,
        data_dir: Path | str | None = None,
        bucket: str | None = None,
        *,
        stopping: bool = False,
    ) -> LocalStack:
        """The stack last started in ``data_dir`` (its ports and settings), or a default one.

        ``stopping``: the stack is only to be stopped, which its pid files are enough for, so an unreadable
        settings file gives the default settings rather than an error that would leave its servers running.
        """
        path = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).resolve()
        state = path / "run" / "stack.json"
        if not state.exists():
            return cls(config, path, bucket=bucket)
        try:
            saved = json.loads(state.read_text())
            return cls(
                config,
                path,
                s3_port=int(saved["s3_port"]),
                mlflow_port=int(saved["mlflow_port"]),
                backend_store_uri=str(saved["backend_store_uri"]),
                serve_artifacts=bool(saved["serve_artifacts"]),
                bucket=bucket,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if stopping:
                return cls(config, path, bucket=bucket)
            raise StackError(_unreadable_settings(state, exc, Supervisor(path / "run", cwd=path))) from None

    # -- what clients use ---------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        """SeaweedFS's S3 port, the first of the ``SEAWEEDFS_PORT_COUNT`` ports it takes."""
        return self._s3_port

    @property
    def mlflow_port(self) -> int:
        return self._mlflow_port

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def master_url(self) -> str:
        """SeaweedFS's master (cluster admin API, e.g. ``/vol/vacuum``): not S3, not signed."""
        return f"http://{HOST}:{services.weed_ports(self.s3_port)['master.port']}"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def artifact_root(self) -> str:
        return f"s3://{self.bucket}/{ARTIFACT_PREFIX}"

    @property
    def uses_local_credentials(self) -> bool:
        """True when the config has no S3 credentials and the built-in local ones are used."""
        return not (self.config.aws_access_key_id and self.config.aws_secret_access_key)

    @property
    def access_key_id(self) -> str:
        return LOCAL_ACCESS_KEY_ID if self.uses_local_credentials else str(self.config.aws_access_key_id)

    @property
    def secret_access_key(self) -> str:
        return LOCAL_SECRET_ACCESS_KEY if self.uses_local_credentials else str(self.config.aws_secret_access_key)

    def env(self) -> dict[str, str]:
        """The variables a client sets to use this stack (as written to ``stack.env``)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            # Blank: SeaweedFS knows the keys alone, and refuses a request that carries a token (AWS SSO's, left in
            # the shell that started the stack with those temporary keys) as InvalidAccessKeyId.
            "AWS_SESSION_TOKEN": "",
            "AWS_DEFAULT_REGION": self.config.aws_region,
        }

    @property
    def env_file(self) -> Path:
        return self.data_dir / "stack.env"

    def log_path(self, service: str) -> Path:
        return self.data_dir / "logs" / f"{service}.log"

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> list[str]:
        """Start whatever is not running yet and wait until both services answer.

        Returns the names of the services started (empty when all were running already).
        Raises :class:`StackError` when a port is taken, ``weed`` is missing, a service exits
        or does not answer within ``startup_timeout``; services started by this call are then
        stopped again.
        """
        self._check_settings_unchanged()
        services.check_driver(self.backend_store_uri)
        launches = self._launches()
        to_start = [launch for launch in launches if self._processes.owned_pid(launch.name) is None]
        # Every check that can refuse comes before the first file is made: a refused `up` leaves
        # no data folder (and no empty mlflow.db) behind, and names no log it never wrote.
        for launch in to_start:
            for port in launch.ports:
                if not port_free(HOST, port):
                    raise StackError(
                        f"port {port} on {HOST} is already in use but {launch.name} needs it; stop what "
                        f"listens there or choose other ports (--s3-port/--mlflow-port)"
                    )
        self._prepare_data_dir()
        started: list[str] = []
        try:
            for launch in to_start:
                if launch.name == SEAWEEDFS:
                    # Read by weed at start only; rewritten so changed credentials take effect.
                    identities = services.identities(self.access_key_id, self.secret_access_key)
                    write_private(self.data_dir / "run" / "s3.json", identities)
                self._spawn(launch)
                started.append(launch.name)
            self._wait_until_healthy()
        except BaseException:
            self._stop(*started)
            raise
        write_private(self.env_file, export_lines(self.env()))
        return started

    def _prepare_data_dir(self) -> None:
        """Make the data folder's parts and record this ``up``'s settings; a folder that cannot hold them (a file
        in its place, no write permission, a full disk) is a :class:`StackError` naming the path, not a traceback."""
        try:
            for sub in ("run", "logs", SEAWEEDFS):
                (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
            services.prepare_sqlite(self.backend_store_uri)
            write_private(self.data_dir / "run" / "stack.json", json.dumps(self._settings(), indent=2))
        except OSError as exc:
            where = exc.filename or self.data_dir
            raise StackError(
                f"cannot prepare the data folder {self.data_dir}: {where}: {exc.strerror or exc}; make it a writable "
                "folder, or pass another --data-dir (or TRACKING_DATA_DIR)"
            ) from None

    def down(self) -> list[str]:
        """Stop the services this stack started (found by pid file); returns the names stopped.

        A pid file whose process is gone, or now belongs to another program, is only removed.
        Data in ``data_dir`` stays.
        """
        return self._stop(*reversed(_SERVICES))

    def running(self) -> list[str]:
        """The services of this stack that run now (started by it, found by pid file)."""
        return [name for name in _SERVICES if self._processes.owned_pid(name) is not None]

    def status(self) -> StackStatus:
        """Each service's pid and liveness, and the size of the data folder."""
        urls = {SEAWEEDFS: self.s3_endpoint_url, MLFLOW: self.tracking_uri}
        statuses = []
        for name in _SERVICES:
            owned = self._processes.owned_pid(name)
            pid = owned if owned is not None else self._processes.recorded_pid(name)
            statuses.append(ServiceStatus(name, pid, owned is not None, urls[name], self.log_path(name)))
        return StackStatus(tuple(statuses), self.data_dir, tree_size(self.data_dir), redact(self.backend_store_uri))

    # -- the two services ---------------------------------------------------------------------

    def _launches(self) -> list[Launch]:
        try:
            weed = services.find_weed()
        except WeedNotFound as exc:
            raise StackError(str(exc)) from None
        return [
            services.weed_launch(weed, self.s3_port, self.data_dir),
            services.mlflow_launch(
                self.mlflow_port, self.artifact_root, self.serve_artifacts, self.backend_store_uri, self.env()
            ),
        ]

    def _settings(self) -> dict[str, Any]:
        return {
            "s3_port": self.s3_port,
            "mlflow_port": self.mlflow_port,
            "backend_store_uri": self.backend_store_uri,
            "serve_artifacts": self.serve_artifacts,
            "bucket": self.bucket,
            # weed reads its identities only at start: other credentials need a restart.
            "access_key_id": self.access_key_id,
        }

    def _check_settings_unchanged(self) -> None:
        running = self.running()
        if not running:
            return
        try:
            saved = json.loads((self.data_dir / "run" / "stack.json").read_text())
        except (OSError, ValueError):
            saved = {}
        changed = sorted(k for k, v in self._settings().items() if saved.get(k) != v)
        if changed:
            raise StackError(
                f"the stack in {self.data_dir} is already running ({', '.join(running)}) with other "
                f"settings ({', '.join(changed)} differ); run `tracking stack down` first"
            )

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, launch: Launch) -> None:
        log_path = self.log_path(launch.name)
        try:
            self._processes.spawn(launch.name, launch.argv, launch.env, log_path)
        except SpawnError as exc:
            raise StackError(f"cannot start {launch.name}: {exc}; log: {log_path}") from None

    def _stop(self, *names: str) -> list[str]:
        try:
            return self._processes.stop(names, self.stop_timeout)
        except StillRunning as exc:
            raise StackError(f"{exc} did not stop even after SIGKILL; log folder: {self.data_dir / 'logs'}") from None

    # -- health -------------------------------------------------------------------------------

    def _wait_until_healthy(self) -> None:
        checks: dict[str, Callable[[], str | None]] = {
            SEAWEEDFS: lambda: services.s3_problem(self.s3_client(), self.bucket),
            MLFLOW: lambda: services.mlflow_problem(self.tracking_uri),
        }
        problem = wait_until_healthy(self._processes, checks, self.log_path, self.startup_timeout)
        if problem is not None:
            raise StackError(problem)

    def s3_client(self) -> Any:
        """A boto3 S3 client for this stack's endpoint and credentials: short timeouts, no retries, made once."""
        if self._client is None:
            self._client = services.s3_client(
                self.s3_endpoint_url, self.access_key_id, self.secret_access_key, self.config.aws_region
            )
        return self._client
