"""Resuming by run ID: a run's Lightning checkpoint as a local file, for ``trainer.fit(model, ckpt_path=...)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tracking import layout
from tracking.config import TrackingConfig
from tracking.downloader import download_files
from tracking.errors import ConfigError
from tracking.integrations.lightning.description import FORMAT
from tracking.selection import Selector, find_checkpoint

RESUME_LINE = "# resume: trainer.fit(model, ckpt_path=tracking.integrations.lightning.checkpoint_path('{run_id}'))"


def checkpoint_path(
    source: str,
    checkpoint: Selector = "latest",
    *,
    to: str | os.PathLike[str] | None = None,
    config: TrackingConfig | None = None,
) -> str:
    """A local copy of a Lightning checkpoint of a run, for ``trainer.fit(model, ckpt_path=...)``.

    ``source`` and ``checkpoint`` name it as in :func:`tracking.load` (a run ID with ``"latest"``,
    ``"best"`` or an int, the run's key: an epoch, or a global step for a run whose ModelCheckpoint
    saved by step; ``models:/...``). The file is downloaded into ``to`` (default: a folder
    per logged model under the temporary directory), checked against its sha256, and its path returned.
    """
    located = find_checkpoint(source, checkpoint, config=config)
    if located.manifest.format != FORMAT:
        raise ConfigError(
            f"run {located.run_id}: {located.label} was logged as format {located.manifest.format!r}, not by "
            "Lightning; load it with tracking.load() instead of resuming a Trainer from it."
        )
    folder = Path(to) if to is not None else Path(tempfile.gettempdir()) / "tracking-lightning" / str(located.model_id)
    download_files(located, folder, force=True)
    return str(folder / layout.CHECKPOINT_FILE)
