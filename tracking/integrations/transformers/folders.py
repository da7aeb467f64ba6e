"""The Trainer's checkpoint folders: their name, and a run's checkpoint materialised as one to resume from.

A folder's ``trainer_state.json`` names the Trainer's best checkpoint (``metric_for_best_model``) by the path
the saving process gave it. A resume elsewhere (another ``output_dir``, another machine, a fresh scratch folder)
finds nothing there, and the Trainer drops it: ``load_best_model_at_end`` would end with the last weights and
``save_total_limit`` would not keep it. So the best checkpoint is materialised beside the resumed one, and the
resumed folder's ``trainer_state.json`` names it there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from tracking import layout
from tracking.config import TrackingConfig
from tracking.downloader import download_files
from tracking.errors import NotFoundError
from tracking.integrations.transformers.description import FORMAT
from tracking.located import Located
from tracking.manifest import Manifest
from tracking.parallel import distributed
from tracking.selection import Selector, find_checkpoint

_log = logging.getLogger(__name__)

# The Trainer's name for a checkpoint folder: checkpoint-<global step> (transformers.trainer_utils).
PREFIX = "checkpoint"
_FOLDER = re.compile(rf"{PREFIX}-(\d+)")
# The Trainer's state in a folder (transformers.trainer's TRAINER_STATE_NAME), and every file of its training
# state: what only a resume from that folder reads (OPTIMIZER_NAME(_BIN), SCHEDULER_NAME, SCALER_NAME, RNG states).
TRAINER_STATE = "trainer_state.json"
_TRAINING_STATE = re.compile(r"trainer_state\.json|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")


@dataclasses.dataclass(frozen=True)
class _Materialised:
    """What materialising a checkpoint left in an ``output_dir``, as rank 0 tells the other ranks: the step and
    manifest.json of its folder, its ``trainer_state.json`` as stored, and the step and manifest.json of the best
    checkpoint materialised beside it (its model's files alone), if any."""

    step: int
    manifest: bytes
    state: bytes | None
    best_step: int | None = None
    best: bytes | None = None

    def folders(self, output_dir: Path) -> dict[Path, bytes]:
        """Each folder it wrote in ``output_dir``, with the manifest.json it holds."""
        found = {output_dir / f"{PREFIX}-{self.step}": self.manifest}
        if self.best_step is not None and self.best is not None:
            found[output_dir / f"{PREFIX}-{self.best_step}"] = self.best
        return found

    def local_state(self, output_dir: Path) -> bytes | None:
        """``trainer_state.json`` naming its best checkpoint in ``output_dir``, or naming none (null) when the run no
        longer holds it: the Trainer's own check would drop it, with a warning that it does not exist anymore."""
        named = _best_step(self.state)
        if self.state is None or named is None:
            return self.state
        state = json.loads(self.state)
        best = output_dir / f"{PREFIX}-{named}"
        state["best_model_checkpoint"] = str(best) if named in (self.step, self.best_step) else None
        return (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()  # as TrainerState.save_to_json


def resumed_folder() -> Path | None:
    """The folder the Trainer's ``train()`` under way resumes from (``resume_from_checkpoint`` as given, or the
    last folder of its ``output_dir`` it found for ``True``); None outside ``train()`` or for a fresh one.

    transformers hands a callback neither the Trainer nor that path: it is read from the training loop's frame.
    """
    # Not imported here: transformers.trainer is heavy, and loaded by whatever Trainer is training.
    trainer = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    if trainer is None:
        return None
    frame = inspect.currentframe()
    for _ in range(_RESUME_DEPTH):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), trainer):
            resumed = frame.f_locals.get("resume_from_checkpoint")
            return Path(resumed) if isinstance(resumed, str | os.PathLike) else None
    return None


# How far up resumed_folder looks: a callback's event, the CallbackHandler's, its call_event, the training loop, and
# the callback's own helpers between them.
_RESUME_DEPTH = 12


def saved_model_only(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint folder of the Trainer's without its optimizer state: one it saved with
    ``save_only_model=True``, which leaves out the scheduler's and the RNG states too (False where no such folder
    is there). The Trainer resumes from it without them, saying nothing above log level info."""
    if not (folder / "trainer_state.json").is_file():
        return False
    return not any((folder / name).is_file() for name in ("optimizer.pt", "optimizer.bin"))


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

    When its ``trainer_state.json`` names the Trainer's best checkpoint (``metric_for_best_model``) at
    another step, that one comes along into ``<output_dir>/checkpoint-<best step>``, its model's files
    alone (no optimizer, scheduler or RNG state), and the resumed ``trainer_state.json`` names it there:
    ``load_best_model_at_end`` loads it and ``save_total_limit`` keeps it, as in a straight run. When
    the run no longer holds it, a warning names the run and its step, and the Trainer resumes without it.

    Under torchrun, every rank calls it once the Trainer is made (the Trainer starts the process
    group): rank 0 downloads first, then each other machine's first rank, then the other ranks; a
    rank whose disk already holds the folders a rank before it wrote (a disk they share) uses them as
    they are. An error on any rank is raised on every rank.
    """
    output = Path(output_dir)
    if not distributed.active():
        if os.environ.get("WORLD_SIZE", "1").strip() not in {"", "1"}:
            _log.warning(
                "checkpoint_folder(%r) before the process group exists: every process downloads the checkpoint; "
                "call it once the Trainer is made, so that one process per disk downloads.",
                source,
            )
        return str(_folder(_materialise(source, checkpoint, output, config), output))
    written = distributed.on_rank0(lambda: _materialise(source, checkpoint, output, config))
    error: BaseException | None = None
    # Each machine's first rank before the machine's other ranks: they then find its folders on their disk.
    for first_on_machine in (True, False):
        if distributed.rank() != 0 and (distributed.local_rank() == 0) == first_on_machine:
            try:
                if not _downloaded(output, written):
                    written = _materialise(source, checkpoint, output, config)
            except BaseException as exc:
                error = exc
        if first_on_machine:
            distributed.barrier()
    distributed.raise_together(error)
    return str(_folder(written, output))


def _folder(written: _Materialised, output_dir: Path) -> Path:
    return output_dir / f"{PREFIX}-{written.step}"


def _materialise(source: str, checkpoint: Selector, output_dir: Path, config: TrackingConfig | None) -> _Materialised:
    """The checkpoint's folder in ``output_dir`` and its best's (each downloaded unless already there, file for
    file), its ``trainer_state.json`` naming the best there."""
    located = find_checkpoint(source, checkpoint, config=config)
    manifest = located.manifest
    if manifest.format != FORMAT or manifest.step is None:
        raise NotFoundError(
            f"run {located.run_id}: {located.label} is a {manifest.format!r} checkpoint, not a Hugging Face Trainer "
            "folder; resume it with tracking.load(..., mode='train'), or pick a checkpoint TrackingCallback logged."
        )
    state = bytes(located.read(TRAINER_STATE)) if TRAINER_STATE in manifest.files else None
    written = _Materialised(manifest.step, manifest.to_json(), state)
    best = _best(located, state, config)
    if best is not None and best.manifest.step is not None:
        # Before the resumed folder: the Trainer's rotation orders the folders by their time, the oldest first.
        _download(best, output_dir / f"{PREFIX}-{best.manifest.step}")
        written = dataclasses.replace(written, best_step=best.manifest.step, best=best.manifest.to_json())
    folder = _folder(written, output_dir)
    _download(located, folder)
    local = written.local_state(output_dir)
    if local is not None and not _holds(folder / TRAINER_STATE, local):
        _replace(folder / TRAINER_STATE, local)
    return written


def _best(located: Located, state: bytes | None, config: TrackingConfig | None) -> Located | None:
    """The best checkpoint ``state`` names at another step, its model's files alone; None when it names none there
    or (said once) when the run no longer holds it."""
    step = _best_step(state)
    if step is None or step == located.manifest.step:
        return None
    try:
        best = find_checkpoint(located.run_id, step=step, config=config)
    except NotFoundError:
        if distributed.rank() == 0:  # every rank resumes alike: said once for the job
            _log.warning(
                "run %s: %s was saved when the Trainer's best checkpoint (metric_for_best_model) was the one of "
                "step %d, which the run no longer holds; the Trainer resumes without it, so load_best_model_at_end "
                "loads a later best only.",
                located.run_id,
                located.label,
                step,
            )
        return None
    model = {name: f for name, f in best.manifest.files.items() if not _TRAINING_STATE.fullmatch(name)}
    return dataclasses.replace(best, manifest=dataclasses.replace(best.manifest, files=model))


def _best_step(state: bytes | None) -> int | None:
    """The global step of the best checkpoint a ``trainer_state.json`` names: its folder's, ``checkpoint-<step>``."""
    try:
        data = None if state is None else json.loads(state)
    except ValueError:
        return None  # not the Trainer's: its resume says what is wrong with it
    named = data.get("best_model_checkpoint") if isinstance(data, dict) else None
    found = _FOLDER.fullmatch(Path(named).name) if isinstance(named, str) else None
    return None if found is None else int(found.group(1))


def _download(located: Located, folder: Path) -> None:
    """``located``'s files in ``folder``, downloaded unless they are there already; its ``trainer_state.json`` is
    not compared: the resumed folder's names its best in this ``output_dir``, and is written after."""
    files = {name: f for name, f in located.manifest.files.items() if name != TRAINER_STATE}
    if not (folder.is_dir() and all(f.held_by(folder / name) for name, f in files.items())):
        download_files(located, folder, force=True)


def _replace(path: Path, data: bytes) -> None:
    """``path`` holding ``data``, whole or not at all: no rank reads half a file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _downloaded(output_dir: Path, written: _Materialised) -> bool:
    """Whether ``output_dir`` holds what materialising ``written`` left (each file was checked before it was moved
    there): the same manifests and file sizes, and the ``trainer_state.json`` that names its best there."""
    try:
        for folder, raw in written.folders(output_dir).items():
            if (folder / layout.MANIFEST_FILE).read_bytes() != raw:
                return False
            files = Manifest.from_json(raw, where=f"{folder}: the manifest rank 0 wrote").files
            if any((folder / name).stat().st_size != f.size for name, f in files.items() if name != TRAINER_STATE):
                return False
        local = written.local_state(output_dir)
        return local is None or _holds(_folder(written, output_dir) / TRAINER_STATE, local)
    except OSError:
        return False


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False
