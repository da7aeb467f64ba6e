"""Log PyTorch state dicts, whole models and resumable checkpoints to MLflow runs on S3,
and load them back by run ID."""

from tracking.checkpoint import LoggedCheckpoint, log_checkpoint, log_model, log_state_dict, wait_for_checkpoints
from tracking.checkpointer import Checkpointer
from tracking.config import TrackingConfig
from tracking.errors import (
    ConfigError,
    IntegrityError,
    MismatchError,
    NotFoundError,
    StorageError,
    TrackingError,
    UnsafeClassError,
)
from tracking.loader import (
    LoadedCheckpoint,
    list_checkpoints,
    load,
    load_model,
    load_pickled_model,
    load_state_dict,
    resolve_run_id,
)
from tracking.rng import capture_rng_state, restore_rng_state
from tracking.spec import rebuildable

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
    "list_checkpoints",
    "load",
    "load_model",
    "load_pickled_model",
    "load_state_dict",
    "log_checkpoint",
    "log_model",
    "log_state_dict",
    "rebuildable",
    "resolve_run_id",
    "restore_rng_state",
    "wait_for_checkpoints",
]
