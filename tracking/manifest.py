"""The manifest written beside every stored artifact: what it is and how to check it.

A checkpoint exists for the loader only once its manifest is stored, so the
manifest is always written last and deleted first (see :mod:`tracking.layout`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import re
import reprlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeGuard

from tracking.errors import IntegrityError

# What a manifest is written as, but for a checkpoint of several optimizers by name (``optimizers``/``schedulers``):
# that one is NAMED_OPTIMIZERS_VERSION, so that a reader older than the names refuses it, rather than rebuilding no
# optimizer from it. A reader reads every version up to NEWEST_VERSION.
FORMAT_VERSION = 1
NAMED_OPTIMIZERS_VERSION = 2
NEWEST_VERSION = NAMED_OPTIMIZERS_VERSION
# "sharded_checkpoint": a checkpoint written by every rank through torch.distributed.checkpoint
# (format "dcp"), its files one shard per rank and their index (see tracking.parallel.sharded).
SHARDED_KIND = "sharded_checkpoint"
KINDS = ("checkpoint", SHARDED_KIND, "state_dict")
CHECKPOINT_KINDS = ("checkpoint", SHARDED_KIND)
# What a run's checkpoints are keyed by (named, listed and picked by): the epoch, or the global step
# for a training that saves every N steps (a Hugging Face or Lightning run saving by step).
EPOCH = "epoch"
STEP = "step"
KEYS = (EPOCH, STEP)


@dataclass(frozen=True)
class StoredFile:
    """Size and SHA-256 of one stored file, as recorded in a manifest."""

    size: int
    sha256: str

    def held_by(self, path: Path) -> bool:
        """Whether the local file at ``path`` has this size and sha256 (False where it is missing or unreadable)."""
        try:
            if not path.is_file() or path.stat().st_size != self.size:
                return False
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                while chunk := stream.read(8 * 1024 * 1024):
                    digest.update(chunk)
        except OSError:
            return False
        return digest.hexdigest() == self.sha256


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
    keyed_by: str = EPOCH
    # Several optimizers (and their schedulers) by name, in place of ``optimizer``/``scheduler``.
    optimizers: dict[str, dict[str, Any]] | None = None
    schedulers: dict[str, dict[str, Any]] | None = None

    @property
    def key(self) -> int | None:
        """What the checkpoint is keyed by in its run: its global step when ``keyed_by`` is "step", else its epoch."""
        return self.step if self.keyed_by == STEP else self.epoch

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = {name: asdict(f) for name, f in self.files.items()}
        for key in ("optimizers", "schedulers"):
            if data[key] is None:
                del data[key]  # a manifest of one optimizer stays as every reader knows it
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | bytearray, *, where: str) -> Manifest:
        """Parse and check a stored manifest; ``where`` names it in errors (e.g. ``run <id>: <path>``).

        Anything but a well-formed manifest raises :class:`IntegrityError`, never another exception:
        a manifest is data from the store, and the store can hold anything.
        """
        if len(raw) > MAX_BYTES:
            raise _corrupt(where, f"it is {len(raw)} bytes, more than the {MAX_BYTES} a manifest may have")
        try:
            data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        except RecursionError:
            raise _corrupt(where, "its JSON is nested too deeply to parse") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e999, ints past the digit limit
            raise IntegrityError(f"{where} is not valid JSON ({exc}); {_NEXT_STEP}") from exc
        if not isinstance(data, dict):
            raise IntegrityError(f"{where} is not a JSON object; {_NEXT_STEP}")
        if _depth(data) > MAX_DEPTH:
            raise _corrupt(where, f"its JSON is nested more than {MAX_DEPTH} levels deep")
        version = data.get("format_version")
        if not _is_int(version):
            raise IntegrityError(f"{where} has no integer format_version; {_NEXT_STEP}")
        if version > NEWEST_VERSION:
            raise IntegrityError(
                f"{where} has format_version {version}, newer than the {NEWEST_VERSION} this version "
                "reads; upgrade the torch-mlflow-tracking package."
            )
        if version < 1:
            raise _corrupt(where, f"format_version is {version}; versions start at 1")
        problem = _problem(data)
        if problem is not None:
            raise _corrupt(where, problem)
        files = {name: StoredFile(f["size"], f["sha256"]) for name, f in data["files"].items()}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "files"}
        if "metrics" in known:
            known["metrics"] = {name: float(value) for name, value in known["metrics"].items()}
        return cls(files=files, **known)


# Bounds on what a manifest may hold, so that reading or verifying a hostile one stays cheap:
# a real manifest lists one or two files and is a few KiB (its optimizer groups name every
# parameter, so a very large model reaches a few MiB).
MAX_BYTES = 64 * 1024 * 1024
MAX_FILES = 10_000
MAX_DEPTH = 100
# "lightning": checkpoint.pt is a Lightning Trainer checkpoint (state_dict, optimizer_states, loops, ...);
# "transformers": the files of a Hugging Face Trainer checkpoint folder (see tracking.integrations).
FORMATS = ("torch", "safetensors", "dcp", "lightning", "transformers")

_NEXT_STEP = (
    "the manifest is corrupted or was edited; load another checkpoint (checkpoint=<epoch>) or log this one again."
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The writer names files checkpoint.pt, state_dict.pt, state_dict.safetensors: a name with a
# slash or "..", or odd characters, would make verify read outside the manifest's own folder.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _corrupt(where: str, problem: str) -> IntegrityError:
    return IntegrityError(f"{where} is malformed: {problem}; {_NEXT_STEP}")


def _refuse_constant(name: str) -> Any:
    # The writer never stores NaN or Infinity (allow_nan=False); Python's parser would accept them.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e999 parses to infinity, which to_json (allow_nan=False) could not write back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is beyond the range of a float")
    return value


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects, counted without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a parsed manifest's fields, or None when they are all well-formed."""
    for key in ("kind", "files", "model"):
        if key not in data:
            return f"it has no {key!r}"
    if data["kind"] not in KINDS:
        return f"kind is {_short(data['kind'])}, expected one of {', '.join(KINDS)}"
    files = data["files"]
    if not isinstance(files, dict) or not files:
        return f"files is {_short(files)}, expected an object of name -> {{size, sha256}}"
    if len(files) > MAX_FILES:
        return f"it lists {len(files)} files, more than the {MAX_FILES} a manifest may list"
    for name, stored in files.items():
        if not _FILE_NAME.fullmatch(name):
            return f"file name {_short(name)} is not a plain file name"
        if not isinstance(stored, dict):
            return f"files[{name!r}] is {_short(stored)}, expected {{size, sha256}}"
        size, sha256 = stored.get("size"), stored.get("sha256")
        if not _is_int(size) or size < 0:
            return f"files[{name!r}].size is {_short(size)}, expected a byte count >= 0"
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            return f"files[{name!r}].sha256 is {_short(sha256)}, expected 64 lowercase hex digits"
    problem = (
        _described_class(data, "model", required=True, kwargs_key="init_kwargs")
        or _described_class(data, "optimizer", required=False, kwargs_key="defaults")
        or _optimizer_groups(data.get("optimizer"))
        or _described_class(data, "scheduler", required=False, kwargs_key="init_kwargs")
        or _described_class(data, "scaler", required=False, kwargs_key=None)
        or _named(data, "optimizers", "optimizer", kwargs_key="defaults")
        or _named(data, "schedulers", "scheduler", kwargs_key="init_kwargs")
    )
    if problem is not None:
        return problem
    for key in ("epoch", "step"):
        value = data.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            return f"{key} is {_short(value)}, expected an integer >= 0"
    if data["kind"] in CHECKPOINT_KINDS and data.get("epoch") is None:
        return "a checkpoint manifest has no epoch"
    keyed_by = data.get("keyed_by", EPOCH)
    if keyed_by not in KEYS:
        return f"keyed_by is {_short(keyed_by)}, expected one of {', '.join(KEYS)}"
    if keyed_by == STEP and data.get("step") is None:
        return "a checkpoint keyed by step has no step"
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        return f"metrics is {_short(metrics)}, expected an object of name -> number"
    for name, value in metrics.items():
        if not _is_number(value):
            return f"metric {name!r} is {_short(value)}, expected a finite number"
    extra_keys = data.get("extra_keys", [])
    if not isinstance(extra_keys, list) or not all(isinstance(k, str) for k in extra_keys):
        return f"extra_keys is {_short(extra_keys)}, expected a list of strings"
    if data.get("format", "torch") not in FORMATS:
        return f"format is {_short(data.get('format'))}, expected one of {', '.join(FORMATS)}"
    if (data["kind"] == SHARDED_KIND) != (data.get("format", "torch") == "dcp"):
        return f"format {_short(data.get('format', 'torch'))} does not go with kind {data['kind']!r}"
    versions = data.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        return f"versions is {_short(versions)}, expected an object of name -> version string"
    if not isinstance(data.get("created_at", ""), str):
        return f"created_at is {_short(data['created_at'])}, expected a string"
    return None


def _described_class(data: dict[str, Any], key: str, *, required: bool, kwargs_key: str | None) -> str | None:
    described = data.get(key)
    if described is None and not required:
        return None
    if not isinstance(described, dict):
        return f"{key} is {_short(described)}, expected an object with a 'class'"
    if key == "scaler" and "class" not in described:
        return None  # the loader falls back to torch's GradScaler
    if not isinstance(described.get("class"), str):
        return f"{key}.class is {_short(described.get('class'))}, expected 'module:QualName'"
    if kwargs_key is not None:
        kwargs = described.get(kwargs_key)
        if kwargs is not None and not isinstance(kwargs, dict):
            return f"{key}.{kwargs_key} is {_short(kwargs)}, expected an object of argument -> value"
    return None


def _named(data: dict[str, Any], key: str, single: str, *, kwargs_key: str) -> str | None:
    """What is wrong with ``optimizers`` or ``schedulers`` (``key``): an object of name -> description."""
    named = data.get(key)
    if named is None:
        return None
    if not isinstance(named, dict) or not named:
        return f"{key} is {_short(named)}, expected an object of name -> {{class, ...}}"
    if data.get(single) is not None:
        return f"it has both {single!r} and {key!r}"
    if key == "schedulers" and not set(named) <= set(data.get("optimizers") or {}):
        return f"schedulers {_short(sorted(named))} are not all named as optimizers"
    for name, described in named.items():
        problem = _described_class({single: described}, single, required=True, kwargs_key=kwargs_key)
        if problem is None and key == "optimizers":
            problem = _optimizer_groups(described)
        if problem is not None:
            return f"{key}[{name!r}]: {problem}"
    return None


def _optimizer_groups(optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list):
        return f"optimizer.param_groups is {_short(groups)}, expected a list of {{params: [names]}}"
    for index, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return f"optimizer.param_groups[{index}] is {_short(group)}, expected {{params: [parameter names]}}"
    return None


def _short(value: Any) -> str:
    """``value`` for an error message, cut short: a hostile manifest may hold megabytes."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache  # importlib.metadata scans sys.path on every call: look once per process
def _installed_versions() -> tuple[tuple[str, str], ...]:
    import mlflow
    import torch

    # MLflow's version from the module: the distribution is "mlflow" or "mlflow-skinny" (a server's or a
    # container's slimmer install), and both are the same MLflow to a reader of the checkpoint.
    out = {"python": platform.python_version(), "torch": torch.__version__, "mlflow": mlflow.__version__}
    try:
        out["torch-mlflow-tracking"] = metadata.version("torch-mlflow-tracking")
    except metadata.PackageNotFoundError:
        pass  # run from a checkout on PYTHONPATH, not installed
    return tuple(out.items())


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
