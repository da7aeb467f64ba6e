"""The stored shape of a run's artifacts: every folder, file and tag name, in one place.

::

    state_dict/state_dict.pt               torch.save(model.state_dict())  (or .safetensors)
    state_dict/manifest.json
    checkpoints/epoch_0007/checkpoint.pt   {"epoch", "model_state", "optim_state", ...}
    checkpoints/epoch_0007/manifest.json   written last: its presence is the commit
    model                                  the whole model, an MLflow logged model (runs:/<id>/model)

The writing side (:mod:`tracking.checkpoint`) and the reading side (:mod:`tracking.loader`)
both import this module and never each other. A checkpoint without a manifest does not
exist: the manifest is written last and deleted first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from tracking.manifest import Manifest
from tracking.storage import ArtifactStore

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoint.pt"
# Where a re-logged epoch's new data waits until its manifest commits (see commit_checkpoint).
STAGED_CHECKPOINT_FILE = "checkpoint.next.pt"
MANIFEST_FILE = "manifest.json"
STATE_DICT_DIR = "state_dict"
STATE_DICT_FILES = {"torch": "state_dict.pt", "safetensors": "state_dict.safetensors"}
MODEL_NAME = "model"

# Run tags pointing at committed checkpoints, so "latest"/"best" cost O(1) calls.
TAG_LATEST = "tracking.checkpoint.latest"
TAG_BEST = "tracking.checkpoint.best"
TAG_BEST_VALUE = "tracking.checkpoint.best_value"
TAG_MONITOR = "tracking.checkpoint.monitor"
TAG_MODE = "tracking.checkpoint.mode"

MODES = ("min", "max")

_EPOCH_FOLDER = re.compile(r"epoch_([0-9]+)")


def checkpoint_dir(epoch: int) -> str:
    """The folder of epoch ``epoch``'s checkpoint, e.g. ``checkpoints/epoch_0007``."""
    return f"{CHECKPOINTS_DIR}/epoch_{epoch:04d}"


def epoch_of(path: str) -> int | None:
    """The epoch of a checkpoint folder (or a file in it) such as ``checkpoints/epoch_0007``; else None."""
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[2] in (CHECKPOINT_FILE, STAGED_CHECKPOINT_FILE, MANIFEST_FILE):
        parts = parts[:2]
    match = _EPOCH_FOLDER.fullmatch(parts[-1]) if len(parts) == 2 and parts[0] == CHECKPOINTS_DIR else None
    return int(match.group(1)) if match else None


def manifest_path(folder: str) -> str:
    return f"{folder}/{MANIFEST_FILE}"


def is_better(value: float, than: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``than`` (None: nothing to beat) for ``mode`` min or max."""
    if than is None or math.isnan(than):
        return True
    return value < than if mode == "min" else value > than


def best_first(values: Mapping[int, float | None], mode: str) -> list[int]:
    """The epochs of ``values`` that have a value, best first; ties go to the earlier epoch."""
    sign = 1.0 if mode == "min" else -1.0
    scored = {epoch: value for epoch, value in values.items() if value is not None}
    return sorted(scored, key=lambda epoch: (sign * scored[epoch], epoch))


def committed_epochs(store: ArtifactStore) -> list[int]:
    """Epochs whose checkpoint manifest is stored: one listing, the fallback for missing tags."""
    epochs = []
    for path in store.list_files(CHECKPOINTS_DIR):
        folder, _, name = path.partition("/")
        match = _EPOCH_FOLDER.fullmatch(folder)
        if name == MANIFEST_FILE and match:
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def read_manifest(store: ArtifactStore, folder: str) -> Manifest:
    path = manifest_path(folder)
    raw = store.read(path)
    return Manifest.from_json(raw if isinstance(raw, bytes | bytearray) else bytes(raw), where=f"{store.owner}: {path}")


def delete_checkpoint(store: ArtifactStore, epoch: int) -> None:
    """Delete one checkpoint: the manifest first, so it stops existing before its data goes."""
    folder = checkpoint_dir(epoch)
    store.delete(manifest_path(folder))
    store.delete(f"{folder}/{CHECKPOINT_FILE}")
    store.delete(f"{folder}/{STAGED_CHECKPOINT_FILE}")


def checkpoint_file(manifest: Manifest) -> str:
    """The data file a checkpoint manifest lists: ``checkpoint.pt``, or the staged name mid re-log."""
    return CHECKPOINT_FILE if CHECKPOINT_FILE in manifest.files else next(iter(manifest.files), CHECKPOINT_FILE)
