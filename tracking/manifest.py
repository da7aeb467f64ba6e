"""The manifest written beside every stored artifact: what it is and how to check it.

A checkpoint exists for the loader only once its manifest is stored, so the
manifest is always written last and deleted first (see :mod:`tracking.layout`).
"""

from __future__ import annotations

import functools
import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from tracking.errors import IntegrityError

FORMAT_VERSION = 1
KINDS = ("checkpoint", "state_dict")


@dataclass(frozen=True)
class StoredFile:
    """Size and SHA-256 of one stored file, as recorded in a manifest."""

    size: int
    sha256: str


@dataclass
class Manifest:
    kind: str
    files: dict[str, StoredFile]
    model: dict[str, Any]
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    extra_keys: list[str] = field(default_factory=list)
    format: str = "torch"
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = {name: asdict(f) for name, f in self.files.items()}
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | bytearray, *, where: str) -> Manifest:
        """Parse a stored manifest; ``where`` names it in errors (e.g. ``run <id>: <path>``)."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{where} is not valid JSON ({exc}); the manifest is corrupted.") from exc
        if not isinstance(data, dict):
            raise IntegrityError(f"{where} is not a JSON object; the manifest is corrupted.")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise IntegrityError(f"{where} has no integer format_version; the manifest is corrupted.")
        if version > FORMAT_VERSION:
            raise IntegrityError(
                f"{where} has format_version {version}, newer than the {FORMAT_VERSION} this version "
                "reads; upgrade the torch-mlflow-tracking package."
            )
        try:
            files = {name: StoredFile(int(f["size"]), str(f["sha256"])) for name, f in data["files"].items()}
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "files"}
            manifest = cls(files=files, **known)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise IntegrityError(f"{where} is missing or has malformed fields ({exc!r}).") from exc
        if manifest.kind not in KINDS or not isinstance(manifest.model, dict) or not manifest.files:
            raise IntegrityError(f"{where} does not describe a {' / '.join(KINDS)} artifact.")
        return manifest


def versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache  # importlib.metadata scans sys.path on every call: look once per process
def _installed_versions() -> tuple[tuple[str, str], ...]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("mlflow", "torch-mlflow-tracking"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
