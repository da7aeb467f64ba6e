"""Checkpoints stored as a framework's folder of files (format ``"transformers"``): the model rebuilt by its
class's own ``from_pretrained`` on the files, the optimizer and scheduler from their ``.pt`` files.

The framework is never imported here: the recorded model class must already be imported (as
:func:`tracking.spec.import_class` requires of every class) and be a ``torch.nn.Module``
subclass before its ``from_pretrained`` is called. Every file is checked against its sha256
before it is written to the temporary folder ``from_pretrained`` reads, and state files load
with ``weights_only=True``; files that are pickles of other objects (``training_args.bin``)
are never read.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torch import nn

from tracking import rebuild, spec
from tracking.errors import MismatchError, NotFoundError
from tracking.located import Located
from tracking.parallel import distributed
from tracking.rebuild import MODEL_HINT, ModelArg
from tracking.storage import BufferReader

FORMAT = "transformers"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
# The state dicts among a folder's files: what the loader reads with torch.load(weights_only=True).
STATE_FILES = (OPTIMIZER_FILE, SCHEDULER_FILE, "scaler.pt")
# Files the Trainer keeps for its own resume: a model does not need them (training_args.bin is a pickle).
_TRAINING_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json")


def is_folder(located: Located) -> bool:
    """Whether ``located`` is a folder checkpoint this module loads."""
    return located.manifest.format == FORMAT


def build_model(located: Located, model: ModelArg, map_location: str | torch.device, strict: bool = True) -> nn.Module:
    """The checkpoint's model on ``map_location``: its class's ``from_pretrained`` on its files, or
    ``model`` (an instance, class or factory) with the weights of ``model.safetensors`` loaded."""
    recorded = located.manifest.model
    built: nn.Module
    if model is None and recorded.get("init_kwargs_source") == "from_pretrained":
        cls = spec.import_class(recorded["class"], "model", run_id=located.run_id, hint=MODEL_HINT)
        built = _from_pretrained(located, cls)
    else:
        weights = _weights(located)
        built = rebuild.build_model(located, model, map_location, weights)
        rebuild.load_weights(located, built, weights, strict)
    return built.to(map_location)


def build_optimizer(
    located: Located,
    model: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer] | None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None,
) -> tuple[torch.optim.Optimizer | None, Any]:
    """The optimizer (from ``optimizer.pt``) and scheduler (from ``scheduler.pt``) with their state.

    A scheduler whose arguments could not be recorded (the Trainer's schedules are lambdas) needs
    ``scheduler=<factory>``; without one it is left out with a warning.
    """
    files = located.manifest.files
    if OPTIMIZER_FILE not in files:
        return None, None
    optim = rebuild.build_optimizer(located, model, optimizer)
    rebuild.load_optimizer(located, model, optim, _torch_file(located, OPTIMIZER_FILE))
    if SCHEDULER_FILE not in files:
        return optim, None
    recorded = located.manifest.scheduler or {}
    if scheduler is None and recorded.get("init_kwargs") is None:
        distributed.warn(  # once for the job: every rank loads it
            f"run {located.run_id}: {located.label}: the scheduler {recorded.get('class', '(unknown)')} cannot be "
            f"rebuilt from its manifest (its arguments are not recorded); {rebuild.SCHEDULER_HINT} to get it back "
            "with its state.",
            RuntimeWarning,
            stacklevel=3,
        )
        return optim, None
    sched = rebuild.build_scheduler(located, optim, scheduler)
    rebuild.load_field(located, "scheduler_state", sched, _torch_file(located, SCHEDULER_FILE))
    return optim, sched


def weights(located: Located) -> dict[str, torch.Tensor]:
    """The model's weights alone, from ``model.safetensors``."""
    return _weights(located)


def _from_pretrained(located: Located, cls: type) -> nn.Module:
    folder = Path(tempfile.mkdtemp(prefix="tracking-pretrained-"))
    try:
        for name in located.manifest.files:
            if name not in _TRAINING_ONLY and not name.startswith("rng_state"):
                (folder / name).write_bytes(located.read(name))
        try:
            built = cls.from_pretrained(str(folder))  # type: ignore[attr-defined]
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise MismatchError(
                f"run {located.run_id}: {located.label}: {spec.class_path(cls)}.from_pretrained refused the "
                f"checkpoint's files ({type(exc).__name__}: {str(exc)[:300]}); install the code the run was "
                f"trained with, or {MODEL_HINT}."
            ) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not isinstance(built, nn.Module):
        raise TypeError(f"{spec.class_path(cls)}.from_pretrained returned {type(built).__name__}, not an nn.Module")
    return built


def _weights(located: Located) -> dict[str, torch.Tensor]:
    if WEIGHTS_FILE not in located.manifest.files:
        raise NotFoundError(
            f"run {located.run_id}: {located.label} has no {WEIGHTS_FILE} (its files: "
            f"{', '.join(sorted(located.manifest.files))}); load it with its class's from_pretrained on "
            "tracking.download's folder."
        )
    from safetensors.torch import load as load_safetensors

    return dict(load_safetensors(bytes(located.read(WEIGHTS_FILE))))


def _torch_file(located: Located, name: str) -> Any:
    data = located.read(name)
    try:
        return torch.load(cast(BinaryIO, BufferReader(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise rebuild.refused_file(located, name, exc) from None
