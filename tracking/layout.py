"""The stored shape of a run's checkpoints and weights: every name, tag and rule, in one place.

::

    run artifacts
        state_dict/state_dict.pt           torch.save(model.state_dict())  (or .safetensors)
        state_dict/manifest.json
    logged models of the run (MLflow 3), each with its own artifact location
        checkpoint-epoch-0007              model type "pytorch-checkpoint", params epoch/step/model_class
                                           (checkpoint-step-00001500 in a run that saves by step)
            checkpoint.pt                  {"epoch", "model_state", "optim_state", ...}
            manifest.json                  written last: its presence is the commit, then READY
        model                              the whole model, MLflow's pytorch flavor
    run tags
        tracking.checkpoint.latest         model ID of the newest committed checkpoint (+ _epoch, or _step)
        tracking.checkpoint.best           model ID of the best one (+ best_value, monitor, mode)
    registry version tags (a version made from a checkpoint)
        tracking.checkpoint.name           checkpoint-epoch-0007 (+ keyed_by, key, epoch, step)

A checkpoint exists once its manifest is stored and its logged model is READY; readers
trust the manifest, never the status alone. The manifest is deleted first.

A run's checkpoints are keyed by one thing, their epoch or (a training that saves every N steps)
their global step: the key names them, orders them (latest is the highest) and picks one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from tracking import manifest as manifest_format

# Re-exported: the writing and the reading side take the keys from here, with every other name.
from tracking.manifest import EPOCH as EPOCH
from tracking.manifest import KEYS as KEYS
from tracking.manifest import STEP as STEP
from tracking.manifest import Manifest
from tracking.storage import ArtifactStore

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
STATE_DICT_DIR = "state_dict"
STATE_DICT_FILES = {"torch": "state_dict.pt", "safetensors": "state_dict.safetensors"}
MODEL_NAME = "model"
# The checkpoint key holding every rank's own state under torchrun: a list by rank, or in a
# sharded checkpoint a dict by rank ("0", "1", ...).
RANK_STATE = "rank_state"
# A Lightning checkpoint of several optimizers: each scheduler's description in the manifest (under the name of
# the optimizer it drives) holds the index of its state in the checkpoint's "lr_schedulers" list.
LR_SCHEDULERS_INDEX = "lr_schedulers_index"

# What a checkpoint's logged model says about itself, for people and for search filters.
CHECKPOINT_MODEL_TYPE = "pytorch-checkpoint"
PARAM_EPOCH = "epoch"
PARAM_STEP = "step"
PARAM_MODEL_CLASS = "model_class"
TAG_FORMAT = "tracking.format"
TAG_FORMAT_VERSION = "tracking.format_version"

# Run tags pointing at committed checkpoints (logged model IDs), so "latest"/"best" cost O(1) calls.
TAG_LATEST = "tracking.checkpoint.latest"
TAG_LATEST_EPOCH = "tracking.checkpoint.latest_epoch"
TAG_LATEST_STEP = "tracking.checkpoint.latest_step"
TAG_BEST = "tracking.checkpoint.best"
TAG_BEST_VALUE = "tracking.checkpoint.best_value"
TAG_MONITOR = "tracking.checkpoint.monitor"
TAG_MODE = "tracking.checkpoint.mode"

# Tags on a registry version made from a checkpoint, so the registry UI says which one it is; MLflow
# records the run (run_id) and the logged model (source models:/<model_id>) itself. The step tag is
# left out when the checkpoint recorded no global step.
VERSION_TAG_CHECKPOINT = "tracking.checkpoint.name"
VERSION_TAG_KEYED_BY = "tracking.checkpoint.keyed_by"
VERSION_TAG_KEY = "tracking.checkpoint.key"
VERSION_TAG_EPOCH = "tracking.checkpoint.epoch"
VERSION_TAG_STEP = "tracking.checkpoint.step"

# Where checkpoints lived before they were logged models: only recognised, to say so.
LEGACY_CHECKPOINTS_DIR = "checkpoints"

# MLflow 3's UI opens in its GenAI view unless a link asks for the training view (runs, models,
# registry); no experiment tag makes it the default, so every link the project prints carries this.
UI_VIEW_QUERY = "?workflowType=machine_learning"

MODES = ("min", "max")

_CHECKPOINT_NAME = re.compile(r"checkpoint-(epoch|step)-([0-9]+)")
_KEY_DIGITS = {EPOCH: 4, STEP: 8}
MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


def checkpoint_name(key: int, keyed_by: str = EPOCH) -> str:
    """The logged model name of a checkpoint: ``checkpoint-epoch-0007``, or ``checkpoint-step-00001500``."""
    return f"checkpoint-{keyed_by}-{key:0{_KEY_DIGITS[keyed_by]}d}"


def key_of(name: str) -> tuple[str, int] | None:
    """What a checkpoint's logged model name says it is keyed by, e.g. ``("step", 1500)``; else None."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def latest_key_tag(keyed_by: str) -> str:
    """The run tag holding the key of the latest checkpoint: ``..._epoch``, or ``..._step``."""
    return TAG_LATEST_STEP if keyed_by == STEP else TAG_LATEST_EPOCH


def keyed_by_of(tags: Mapping[str, str]) -> str | None:
    """What a run's committed checkpoints are keyed by, as its pointer tags say; None before its first."""
    if tags.get(TAG_LATEST_STEP):
        return STEP
    return EPOCH if tags.get(TAG_LATEST_EPOCH) else None


def label(keyed_by: str, key: int | None) -> str:
    """How messages name a checkpoint's key: ``epoch 7``, ``step 1500``."""
    return f"{keyed_by} {key}"


def is_better(value: float, than: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``than`` (None: nothing to beat) for ``mode`` min or max."""
    if than is None or math.isnan(than):
        return True
    return value < than if mode == "min" else value > than


def best_first(values: Mapping[int, float | None], mode: str) -> list[int]:
    """The keys (epochs or steps) of ``values`` that have a value, best first; ties go to the earlier one."""
    sign = 1.0 if mode == "min" else -1.0
    scored = {key: value for key, value in values.items() if value is not None}
    return sorted(scored, key=lambda key: (sign * scored[key], key))


def read_manifest(store: ArtifactStore, folder: str = "") -> Manifest:
    """The manifest in ``folder`` of ``store`` (a checkpoint's is at the root of its logged model)."""
    path = manifest_path(folder)
    # Bounded before it is read: a huge object in a manifest's place must not be read into memory to be refused.
    raw = store.read(path, limit=manifest_format.MAX_BYTES)
    return Manifest.from_json(raw if isinstance(raw, bytes | bytearray) else bytes(raw), where=f"{store.owner}: {path}")


def manifest_path(folder: str = "") -> str:
    return f"{folder}/{MANIFEST_FILE}" if folder else MANIFEST_FILE
