"""Log PyTorch state dicts, whole models and resumable checkpoints to MLflow runs on S3,
and load them back by run ID.

Names are imported on first use, so ``import tracking`` (and the ``tracking`` command
line) does not pay for torch and mlflow until they are needed. Importing it bounds MLflow's
HTTP timeout and retries where the user set none (:func:`tracking.config.bound_mlflow_requests`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tracking import config as _config

# MLflow's own HTTP defaults wait minutes on a silent tracking server (see tracking.config). Bounded here, on
# import, not at the library's first call: a script's own mlflow.start_run() or search before that call is bounded
# too. Only the variables the user left unset are set, and this module imports neither MLflow nor torch.
_config.bound_mlflow_requests()

# public name -> module that defines it
_EXPORTS = {
    "Checkpointer": "tracking.checkpointer",
    "ConfigError": "tracking.errors",
    "IntegrityError": "tracking.errors",
    "LoadedCheckpoint": "tracking.loaded",
    "LoggedCheckpoint": "tracking.catalog",
    "MismatchError": "tracking.errors",
    "NotFoundError": "tracking.errors",
    "StorageError": "tracking.errors",
    "TrackingConfig": "tracking.config",
    "TrackingError": "tracking.errors",
    "UnsafeClassError": "tracking.errors",
    "capture_rng_state": "tracking.rng",
    "download": "tracking.downloader",
    "find_checkpoint": "tracking.selection",
    "list_checkpoints": "tracking.selection",
    "load": "tracking.loader",
    "load_model": "tracking.loader",
    "load_pickled_model": "tracking.loader",
    "load_state_dict": "tracking.loader",
    "log_checkpoint": "tracking.checkpoint",
    "log_model": "tracking.model_logs",
    "log_state_dict": "tracking.model_logs",
    "rebuildable": "tracking.spec",
    "register": "tracking.registry",
    "resolve_run_id": "tracking.source",
    "restore": "tracking.loader",
    "restore_rng_state": "tracking.rng",
    "wait_for_checkpoints": "tracking.saver",
}

__all__ = [
    "Checkpointer",
    "ConfigError",
    "IntegrityError",
    "LoadedCheckpoint",
    "LoggedCheckpoint",
    "MismatchError",
    "NotFoundError",
    "StorageError",
    "TrackingConfig",
    "TrackingError",
    "UnsafeClassError",
    "capture_rng_state",
    "download",
    "find_checkpoint",
    "list_checkpoints",
    "load",
    "load_model",
    "load_pickled_model",
    "load_state_dict",
    "log_checkpoint",
    "log_model",
    "log_state_dict",
    "rebuildable",
    "register",
    "resolve_run_id",
    "restore",
    "restore_rng_state",
    "wait_for_checkpoints",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from tracking.catalog import LoggedCheckpoint
    from tracking.checkpoint import log_checkpoint
    from tracking.checkpointer import Checkpointer
    from tracking.config import TrackingConfig
    from tracking.downloader import download
    from tracking.errors import (
        ConfigError,
        IntegrityError,
        MismatchError,
        NotFoundError,
        StorageError,
        TrackingError,
        UnsafeClassError,
    )
    from tracking.loaded import LoadedCheckpoint
    from tracking.loader import load, load_model, load_pickled_model, load_state_dict, restore
    from tracking.model_logs import log_model, log_state_dict
    from tracking.registry import register
    from tracking.rng import capture_rng_state, restore_rng_state
    from tracking.saver import wait_for_checkpoints
    from tracking.selection import find_checkpoint, list_checkpoints
    from tracking.source import resolve_run_id
    from tracking.spec import rebuildable
