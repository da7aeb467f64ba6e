"""Resuming by run ID: a run's Lightning checkpoint as a local file, for ``trainer.fit(model, ckpt_path=...)``."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tracking import catalog, layout
from tracking.config import TrackingConfig
from tracking.downloader import download_files
from tracking.errors import ConfigError
from tracking.integrations.lightning.description import FORMAT, weights_only
from tracking.located import Located
from tracking.run import RunHandle
from tracking.selection import Selector, find_checkpoint

logger = logging.getLogger(__name__)

RESUME_LINE = "# resume: trainer.fit(model, ckpt_path=tracking.integrations.lightning.checkpoint_path('{run_id}'))"
# What works with a checkpoint of the weights alone, said where a resume would be ({run_id} filled in).
LOAD_WEIGHTS = (
    "tracking.load('{run_id}').model (or tracking.load_model), or "
    "YourModule.load_from_checkpoint(checkpoint_path('{run_id}'))"
)
WEIGHTS_ONLY_NEXT = f"Load the weights: {LOAD_WEIGHTS}"
WEIGHTS_ONLY_LINE = f"# weights only (ModelCheckpoint(save_weights_only=True)), no resume: {WEIGHTS_ONLY_NEXT}"


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
    per logged model, and per rank under DDP, under the temporary directory), checked against its
    sha256, and its path returned; a ``to`` that holds it already is left as it is, and processes
    given one ``to`` (the ranks of a job) download into it one at a time, the first for them all.
    """
    located = find_checkpoint(source, checkpoint, config=config)
    if located.manifest.format != FORMAT:
        raise ConfigError(
            f"run {located.run_id}: {located.label} was logged as format {located.manifest.format!r}, not by "
            "Lightning; load it with tracking.load() instead of resuming a Trainer from it."
        )
    if weights_only(located.manifest):
        # Still a Lightning checkpoint (YourModule.load_from_checkpoint reads it), but no fit resumes from it.
        logger.warning(
            "run %s: %s holds the weights only (ModelCheckpoint(save_weights_only=True)), so "
            "trainer.fit(ckpt_path=...) cannot resume from it. %s.",
            located.run_id,
            located.label,
            WEIGHTS_ONLY_NEXT.replace("{run_id}", located.run_id),
        )
    folder = Path(to) if to is not None else _default_folder(str(located.model_id))
    _download_once(located, folder)
    return str(folder / layout.CHECKPOINT_FILE)


def _default_folder(model_id: str) -> Path:
    """A folder per logged model under the temporary directory, and per rank under DDP: every rank resumes from
    the file (before the process group exists), and a download swaps files a rank beside it may be reading."""
    # RANK from torchrun; LOCAL_RANK from Lightning's own launcher, which sets it in the processes it starts.
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "")).strip()
    name = f"{model_id}-rank-{rank}" if rank.isdigit() else model_id
    return Path(tempfile.gettempdir()) / "tracking-lightning" / name


def _download_once(located: Located, folder: Path) -> None:
    """``located``'s files in ``folder``, downloaded unless it holds them already. Processes sharing a folder (the
    ranks of a job given one ``to``) take turns: the first downloads, the others find the files and leave them be,
    so none swaps a file another is reading."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    turn = _take_turn(folder)
    try:
        if not _holds(folder, located):
            download_files(located, folder, force=True)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a failed download leaves no empty folder behind, as download_files itself does
        raise
    finally:
        if turn is not None:
            os.close(turn)  # releases the lock


def _take_turn(folder: Path) -> int | None:
    """An exclusive lock on ``folder`` itself (a file in it would be swapped as stale), held until the descriptor
    returned is closed; None where there can be none (no ``fcntl`` on Windows; NFS may refuse a folder's lock): its
    processes then download into it at once, as before there were turns."""
    try:
        import fcntl

        turn = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError) as exc:
        logger.debug("no lock on %s (%s): its processes may download into it at once", folder, exc)
        return None
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)
    except OSError as exc:
        logger.debug("no lock on %s (%s): its processes may download into it at once", folder, exc)
    return turn


def _holds(folder: Path, located: Located) -> bool:
    """Whether ``folder`` holds ``located``'s manifest and each of its files, checked against its sha256."""
    try:
        if (folder / layout.MANIFEST_FILE).read_bytes() != located.manifest.to_json():
            return False
    except OSError:
        return False
    return all(expected.held_by(folder / name) for name, expected in located.manifest.files.items())


def refuse_resume(handle: RunHandle, checkpoint: Mapping[str, Any], keyed_by: str | None) -> None:
    """Refuse, before it trains, a fit that resumes from ``checkpoint`` and logs to the run of ``handle`` when the
    run has checkpoints after it (see :func:`tracking.catalog.refuse_rewind`)."""
    keyed_by = keyed_by or layout.EPOCH
    resumed = int(checkpoint["global_step"] if keyed_by == layout.STEP else checkpoint["epoch"])
    catalog.refuse_rewind(handle, keyed_by, resumed, _from_latest(handle))


def refuse_restart(handle: RunHandle) -> None:
    """Refuse, before it trains, a fit that resumes from no checkpoint and logs to the run of ``handle`` when the
    run has Lightning checkpoints (see :func:`tracking.catalog.refuse_restart`). When the run's latest holds the
    weights alone, no fit resumes from it, and the error offers the new run only."""

    def no_resume(latest: catalog.StoredCheckpoint) -> str | None:
        if not weights_only(latest.read_manifest()):
            return None
        return (
            f"the run's latest, {layout.label(latest.keyed_by, latest.key)}, holds the weights alone "
            "(ModelCheckpoint(save_weights_only=True)), from which no fit resumes; to start the new run from them, "
            f"load them: {LOAD_WEIGHTS.replace('{run_id}', handle.run_id)}"
        )

    catalog.refuse_restart(handle, FORMAT, _from_latest(handle), no_resume=no_resume)


def _from_latest(handle: RunHandle) -> str:
    return f"trainer.fit(model, ckpt_path=checkpoint_path({handle.run_id!r}))"


def take_writers_states(checkpoint: dict[str, Any], paths: Iterable[str]) -> None:
    """Put into ``checkpoint`` (the one a fit resumes from) each ModelCheckpoint's state as the last file it
    wrote of that save holds it: ``paths``, the local files that are that checkpoint.

    Where several ModelCheckpoints save at one step, each writes a file with every callback's state at that
    moment, and the file written first is the logged model a resume by run ID loads. In it, the states of
    those that saved after it lack their own save: resumed from it, they never remove that save's file (nor
    delete its logged model), one more kept at every resume. A ModelCheckpoint's state names its folder; the
    last file written there holds its state after its save (and that of any other saving there before).
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return
    written = []
    for path in paths:
        try:
            written.append((os.stat(path).st_mtime_ns, path))
        except OSError:
            continue  # removed since, or on another machine
    for _, path in sorted(written):  # the last written wins
        try:
            # mmap: the states are read, the weights stay on disk.
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("callbacks")
        except Exception as exc:  # unreadable or beyond weights_only: those states stay as the loaded file has them
            logger.debug("not reading the ModelCheckpoint states in %s: %s", path, exc)
            continue
        folder = os.path.dirname(os.path.abspath(path))
        for key, state in (saved or {}).items():
            dirpath = state.get("dirpath") if isinstance(state, dict) else None
            if key in states and dirpath and os.path.abspath(dirpath) == folder:
                states[key] = state
