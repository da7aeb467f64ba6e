"""The Trainer's checkpoint folders: their name, and a run's checkpoint materialised as one to resume from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tracking.config import TrackingConfig
from tracking.download import download_files
from tracking.errors import NotFoundError
from tracking.integrations.transformers.description import FORMAT
from tracking.selection import Selector, find_checkpoint

# The Trainer's name for a checkpoint folder: checkpoint-<global step> (transformers.trainer_utils).
PREFIX = "checkpoint"


def checkpoint_folder(
    source: str,
    checkpoint: Selector = "latest",
    *,
    output_dir: str | os.PathLike[str],
    config: TrackingConfig | None = None,
) -> str:
    """A run's checkpoint as the Trainer's folder ``<output_dir>/checkpoint-<step>``, for ``resume_from_checkpoint``.

    ``source`` and ``checkpoint`` name it as in :func:`tracking.load` (a run ID with ``"latest"``,
    ``"best"`` or an epoch; ``models:/...``). Every file is checked against its sha256; a folder
    already there with the same files is used as it is, one with other content is overwritten.
    """
    located = find_checkpoint(source, checkpoint, config=config)
    manifest = located.manifest
    if manifest.format != FORMAT or manifest.step is None:
        raise NotFoundError(
            f"run {located.run_id}: {located.label} is a {manifest.format!r} checkpoint, not a Hugging Face Trainer "
            "folder; resume it with tracking.load(..., mode='train'), or pick a checkpoint TrackingCallback logged."
        )
    folder = Path(output_dir) / f"{PREFIX}-{manifest.step}"
    if folder.is_dir() and all(_matches(folder / name, f.size, f.sha256) for name, f in manifest.files.items()):
        return str(folder)
    download_files(located, folder, force=True)
    return str(folder)


def _matches(path: Path, size: int, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest() == sha256
