"""What ``tracking stack status`` reports: each service as seen from its pid file, and the data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServiceStatus:
    """One service of the stack as seen from its pid file."""

    name: str
    pid: int | None
    alive: bool
    url: str
    log: Path


@dataclass(frozen=True)
class StackStatus:
    """What :meth:`LocalStack.status` reports."""

    services: tuple[ServiceStatus, ...]
    data_dir: Path
    data_bytes: int
    backend_store_uri: str
