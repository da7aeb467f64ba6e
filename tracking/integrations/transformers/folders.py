"""The Trainer's checkpoint folders: their name, and a run's checkpoint materialised as one to resume from."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tracking import layout
from tracking.config import TrackingConfig
from tracking.downloader import download_files
from tracking.errors import NotFoundError
from tracking.integrations.transformers.description import FORMAT
from tracking.manifest import Manifest
from tracking.parallel import distributed
from tracking.selection import Selector, find_checkpoint

_log = logging.getLogger(__name__)

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
    ``"best"`` or an int: the global step of a run saved by steps, else the epoch; ``models:/...``).
    Every file is checked against its sha256; a folder already there with the same files is used as
    it is, one with other content is overwritten.

    Under torchrun, every rank calls it once the Trainer is made (the Trainer starts the process
    group): rank 0 downloads first, then each other machine's first rank, then the other ranks; a
    rank whose disk already holds the folder a rank before it wrote (a disk they share) uses it as
    it is. An error on any rank is raised on every rank.
    """
    output = Path(output_dir)
    if not distributed.active():
        if os.environ.get("WORLD_SIZE", "1").strip() not in {"", "1"}:
            _log.warning(
                "checkpoint_folder(%r) before the process group exists: every process downloads the checkpoint; "
                "call it once the Trainer is made, so that one process per disk downloads.",
                source,
            )
        return str(_materialise(source, checkpoint, output, config)[0])
    written = distributed.on_rank0(lambda: _materialise(source, checkpoint, output, config)[1].to_json())
    manifest = Manifest.from_json(written, where=f"{source}: the manifest rank 0 downloaded")
    folder = output / f"{PREFIX}-{manifest.step}"
    error: BaseException | None = None
    # Each machine's first rank before the machine's other ranks: they then find its folder on their disk.
    for first_on_machine in (True, False):
        if distributed.rank() != 0 and (distributed.local_rank() == 0) == first_on_machine:
            try:
                if not _downloaded(folder, manifest, written):
                    folder = _materialise(source, checkpoint, output, config)[0]
            except BaseException as exc:
                error = exc
        if first_on_machine:
            distributed.barrier()
    distributed.raise_together(error)
    return str(folder)


def _materialise(
    source: str, checkpoint: Selector, output_dir: Path, config: TrackingConfig | None
) -> tuple[Path, Manifest]:
    """The checkpoint's folder in ``output_dir`` (downloaded unless already there, file for file) and its manifest."""
    located = find_checkpoint(source, checkpoint, config=config)
    manifest = located.manifest
    if manifest.format != FORMAT or manifest.step is None:
        raise NotFoundError(
            f"run {located.run_id}: {located.label} is a {manifest.format!r} checkpoint, not a Hugging Face Trainer "
            "folder; resume it with tracking.load(..., mode='train'), or pick a checkpoint TrackingCallback logged."
        )
    folder = output_dir / f"{PREFIX}-{manifest.step}"
    if not (folder.is_dir() and all(_matches(folder / name, f.size, f.sha256) for name, f in manifest.files.items())):
        download_files(located, folder, force=True)
    return folder, manifest


def _downloaded(folder: Path, manifest: Manifest, written: bytes) -> bool:
    """Whether ``folder`` is what a download of ``manifest`` left (each file was checked before it was moved there)."""
    try:
        if (folder / layout.MANIFEST_FILE).read_bytes() != written:
            return False
        return all((folder / name).stat().st_size == f.size for name, f in manifest.files.items())
    except OSError:
        return False


def _matches(path: Path, size: int, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest() == sha256
