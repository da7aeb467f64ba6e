"""Where the user's local stacks run, recorded per user so that commands find them from any folder.

``tracking stack up`` writes one small JSON file per stack (its data folder and ports) into
``$XDG_STATE_HOME/tracking/stacks/`` (default ``~/.local/state/tracking/stacks/``); ``down``
removes it. A command run outside the project (no ``.tracking/`` where it stands) then finds the
stack that runs, and ``up`` on a port that one of these stacks holds names that stack.

Only the ``tracking stack`` commands and the CLI's server lookup read or write these records; a
:class:`~tracking.localstack.stack.LocalStack` made in code (tests, the benchmark) is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tracking.config import TrackingConfig
from tracking.localstack.services import SEAWEEDFS_PORT_COUNT
from tracking.localstack.settings import ENV_VARS, StackSettings
from tracking.localstack.stack import LocalStack, StackError

STATE_HOME_VAR = "XDG_STATE_HOME"


@dataclass(frozen=True)
class Record:
    """A stack that ``up`` started: its data folder, its ports and when it started."""

    data_dir: Path
    s3_port: int
    mlflow_port: int
    started_at: float

    def holds(self, port: int) -> bool:
        """True when ``port`` is one of this stack's: SeaweedFS's block or MLflow's."""
        return port == self.mlflow_port or self.s3_port <= port < self.s3_port + SEAWEEDFS_PORT_COUNT


def folder(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user folder of records: ``$XDG_STATE_HOME/tracking/stacks`` or ``~/.local/state/tracking/stacks``."""
    env = os.environ if environ is None else environ
    base = env.get(STATE_HOME_VAR)
    # The XDG spec ignores a relative value: it would name a different place in every folder.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "tracking" / "stacks"


def write(records: Path, data_dir: Path, s3_port: int, mlflow_port: int) -> None:
    """Record that the stack in ``data_dir`` runs on these ports (replacing its earlier record).

    Best effort: a home folder that cannot be written leaves the stack usable from its own
    folder, which is how it was found before records existed.
    """
    entry = {"data_dir": str(data_dir), "s3_port": s3_port, "mlflow_port": mlflow_port, "started_at": time.time()}
    try:
        records.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=records, prefix=".record-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(temporary, _path(records, data_dir))  # atomic: a reader never sees half a record
    except OSError:
        return


def remove(records: Path, data_dir: Path) -> None:
    """Forget the stack in ``data_dir`` (``down`` stopped it)."""
    try:
        _path(records, data_dir).unlink(missing_ok=True)
    except OSError:
        return


def read(records: Path) -> list[Record]:
    """Every readable record, newest first; unreadable or malformed ones are skipped (and stay)."""
    found = []
    try:
        paths = sorted(records.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            raw = json.loads(path.read_text())
            found.append(
                Record(Path(raw["data_dir"]), int(raw["s3_port"]), int(raw["mlflow_port"]), float(raw["started_at"]))
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda record: record.started_at, reverse=True)


def locate(
    config: TrackingConfig,
    data_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    stopping: bool = False,
) -> LocalStack:
    """The stack a command means: ``data_dir`` (``--data-dir``) or ``$TRACKING_DATA_DIR`` when given;
    else ``./.tracking`` when a stack was ever started there; else the newest recorded stack that
    runs; else ``./.tracking`` (where ``up`` starts a new one). ``stopping``: as for
    :meth:`LocalStack.from_data_dir`, a damaged settings file does not stand in the way of ``down``."""
    env = os.environ if environ is None else environ
    settings = StackSettings.from_env(env, data_dir=data_dir)
    here = LocalStack.from_data_dir(config, settings.data_dir, bucket=settings.bucket, stopping=stopping)
    if data_dir is not None or env.get(ENV_VARS["data_dir"]) or (here.data_dir / "run" / "stack.json").exists():
        return here
    return running(config, folder(env), settings.bucket) or here


def running(config: TrackingConfig, records: Path, bucket: str | None = None) -> LocalStack | None:
    """The newest recorded stack with a service running, or None."""
    for record in read(records):
        stack = _live_stack(config, record, bucket)
        if stack is not None:
            return stack
    return None


def holder(config: TrackingConfig, records: Path, port: int, besides: Path) -> LocalStack | None:
    """The running recorded stack, other than the one in ``besides``, that holds ``port``; or None."""
    for record in read(records):
        if record.data_dir == besides or not record.holds(port):
            continue
        stack = _live_stack(config, record, None)
        if stack is not None:
            return stack
    return None


def _live_stack(config: TrackingConfig, record: Record, bucket: str | None) -> LocalStack | None:
    if not (record.data_dir / "run" / "stack.json").exists():
        return None  # its data folder was deleted
    try:
        stack = LocalStack.from_data_dir(config, record.data_dir, bucket=bucket)
    except StackError:
        return None  # its settings file is unreadable: `status --data-dir` there says so
    return stack if stack.running() else None


def _path(records: Path, data_dir: Path) -> Path:
    # One file per data folder: two stacks never write the same file.
    return records / f"{hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]}.json"
