"""Loading: a run ID (or registry URI) -> a live model, optimizer, scheduler and scaler.

Which run and checkpoint a source names is :mod:`tracking.selection`'s business; how the
objects are rebuilt from the state is :mod:`tracking.rebuild`'s; how the tensors avoid a
copy is :mod:`tracking.zerocopy`'s.

Every file is checked against its manifest's size and sha256 before ``torch.load``,
state always loads with ``weights_only=True``, and recorded classes are checked to
be Module / Optimizer / scheduler subclasses before they are called. A load never
modifies anything on the store.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, cast

import torch
from torch import nn

from tracking import layout, lightning_state, optimizers, pairing, pretrained, rebuild, spec, zerocopy
from tracking.config import TrackingConfig
from tracking.device import check_available, check_map_location, to_device
from tracking.errors import ConfigError, NotFoundError, TrackingError
from tracking.loaded import LoadedCheckpoint, loaded
from tracking.located import Located
from tracking.manifest import CHECKPOINT_KINDS, SHARDED_KIND, Manifest
from tracking.parallel import distributed
from tracking.rebuild import ModelArg
from tracking.selection import Selector, find_checkpoint, find_weights
from tracking.source import resolve_run_id
from tracking.storage import BufferReader, open_store

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def load(
    source: str,
    checkpoint: Selector = "latest",
    *,
    step: int | None = None,
    map_location: str | torch.device = "cpu",
    mode: str = "eval",
    model: ModelArg = None,
    optimizer: OptimizerFactory | Mapping[str, OptimizerFactory] | None = None,
    scheduler: SchedulerFactory | Mapping[str, SchedulerFactory] | None = None,
    strict: bool = True,
    config: TrackingConfig | None = None,
) -> LoadedCheckpoint:
    """Rebuild the model, optimizer, scheduler and AMP scaler of a logged checkpoint.

    ``source`` is a run ID or ``runs:/<id>`` (then ``checkpoint`` is ``"latest"``, ``"best"``
    or an epoch number, a step number in a run keyed by step, and ``step=`` picks the checkpoint
    logged at that global step instead), a checkpoint's logged model ``models:/<model_id>``, or a registry version
    ``models:/<name>@<alias>`` / ``models:/<name>/<version>``: the checkpoint it was made from.
    ``mode="eval"`` returns the model in eval mode, ``"train"`` ready to resume.
    Pass ``model=`` (instance or factory), ``optimizer=`` (factory taking the model's
    parameters) or ``scheduler=`` (factory taking the optimizer) for classes that
    cannot be rebuilt from the manifest. For a checkpoint of several optimizers by name,
    ``mode="train"`` rebuilds each, and the result's ``optimizer`` and ``scheduler`` are dicts
    by name; ``optimizer=`` and ``scheduler=`` then map some of those names to factories. A factory given for a
    checkpoint saved without an optimizer (or scheduler) is not used, with a warning.
    """
    _check_mode(mode)
    check_map_location(map_location)
    optimizers.check_factories(optimizer, scheduler)
    located = find_checkpoint(source, checkpoint, step=step, config=config)
    manifest = located.manifest
    pairing.match(located, "optimizer", optimizer, "tracking.load")
    pairing.match(located, "scheduler", scheduler, "tracking.load")
    pairing.unheld(located, {"optimizer": optimizer, "scheduler": scheduler}, "tracking.load")
    check_available(map_location)
    if pretrained.is_folder(located):
        # A framework's folder of files (the Hugging Face Trainer's): its optimizer (optimizer.pt, as big as the
        # model twice over for Adam) is read to resume, or when a factory given for it or its scheduler says that it
        # is wanted, in any mode, as for every other checkpoint: a factory is never left unused without a word.
        built = pretrained.build_model(located, model, map_location, strict)
        optim, sched = None, None
        if mode == "train" or optimizer is not None or scheduler is not None:
            if isinstance(optimizer, Mapping) or isinstance(scheduler, Mapping):
                raise TypeError(f"run {located.run_id}: {located.label} holds one optimizer; pass one factory")
            optim, sched = pretrained.build_optimizer(located, built, optimizer, scheduler)
        built.train(mode == "train")
        return loaded(located, {"epoch": manifest.epoch, "step": manifest.step}, built, optim, sched, None)
    # The checkpoint's tensors share the download buffer: the model adopts its part of it
    # and the optimizer keeps the rest, so nothing is copied and nothing is left over. It is
    # read on the CPU whatever map_location says: only the weights, the optimizer state (which
    # load_state_dict moves to its parameters' device) and the scaler follow map_location; RNG
    # states, rank_state and counters must stay on the host.
    read = _read_torch(located, "cpu", share=True)
    lightning_state.undescribed_states(located, read)
    state = rebuild.checkpoint_state(located, read)
    built = rebuild.build_model(located, model, map_location, state["model_state"])
    plain = distributed.unwrap(built)  # a model=torch.compile(...) or DataParallel(...) takes the state in its module
    adopted = rebuild.load_weights(located, plain, state["model_state"], strict, adopt=True)
    optim = None
    if state.get("optim_state") is not None:
        optim = pairing.build(located, plain, optimizer)
        # A model that copied its weights leaves its part of the buffer unused: the optimizer
        # state then gets copies of its own, so that the buffer can be freed.
        pairing.load_into(located, plain, optim, state["optim_state"] if adopted else _own(state["optim_state"]))
    sched = None
    if state.get("scheduler_state") is not None and optim is None:
        pairing.driverless_scheduler(located)
    elif state.get("scheduler_state") is not None:
        sched = pairing.build_schedulers(located, optim, scheduler, _own(state["scheduler_state"]))
    scaler = None
    if state.get("scaler_state") is not None:
        scaler_cls = spec.import_class(
            (manifest.scaler or {}).get("class", "torch.amp.grad_scaler:GradScaler"),
            "scaler",
            run_id=located.run_id,
            hint="install a torch that provides it",
        )
        scaler = scaler_cls(torch.device(map_location).type)
        rebuild.load_field(located, "scaler_state", scaler, _own(state["scaler_state"]))
    built.train(mode == "train")
    # What the result keeps besides the live objects gets its own tensors: the buffer is freed.
    return loaded(located, state, built, optim, sched, scaler, keep=_own)


@distributed.together
def restore(
    source: str,
    model: nn.Module,
    optimizer: optimizers.Optimizers | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    checkpoint: Selector = "latest",
    step: int | None = None,
    strict: bool = True,
    config: TrackingConfig | None = None,
) -> LoadedCheckpoint:
    """Load a logged checkpoint into existing objects: the model, and the optimizer, scheduler and scaler given.

    ``source``, ``checkpoint`` and ``step`` mean what they mean for :func:`load`. Under ``torchrun``
    every rank calls it: rank 0 finds the checkpoint (the only rank to ask MLflow), every rank
    reads what it needs from the store; every rank returns, or every rank raises the same error (a rank that
    cannot read its own shards fails them all). A sharded checkpoint loads into a sharded model (FSDP2)
    of any number of ranks, or into a plain one; a checkpoint of a whole model (one process's, or
    DDP's) loads into the module a ``DistributedDataParallel`` wraps, or into an FSDP2 model, each
    rank keeping its own shards. The result's ``rank_state`` is this rank's own.
    A checkpoint of several optimizers by name restores into ``optimizer={name: optimizer}`` with
    the same names (``scheduler=`` likewise, or None: a scheduler needs the optimizer it drives, schedulers by
    name their optimizers by name). An optimizer, scheduler or scaler given for a checkpoint saved without one
    is left as it is, with a warning.
    """
    from tracking.parallel import sharded

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # What each is first (so that a scheduler="nope" is named as such), then as log_checkpoint takes them: a
    # scheduler only with its optimizer, schedulers by name only with their optimizers, each under its own name.
    optimizers.check_loadable(scheduler, scaler)
    optimizers.check(optimizer, scheduler, None)
    config = config or TrackingConfig.from_env()

    def find() -> tuple[str, str, str, str, Manifest, str | None]:
        found = find_checkpoint(source, checkpoint, step=step, config=config)
        return found.run_id, found.store.artifact_uri, found.store.owner, found.folder, found.manifest, found.model_id

    wanted = f"checkpoint={checkpoint!r}" + (f", step={step}" if step is not None else "")
    arrival = f"tracking.restore({source!r}, {wanted})"
    run_id, artifact_uri, owner, folder, manifest, model_id = distributed.on_rank0(find, arrival=arrival)
    located = Located(run_id, open_store(artifact_uri, config, owner=owner), folder, manifest, model_id)
    pairing.match(located, "optimizer", optimizer, "tracking.restore")
    pairing.match(located, "scheduler", scheduler, "tracking.restore")
    plain = distributed.unwrap(model)
    if pretrained.is_folder(located):
        raise TrackingError(
            f"run {run_id}: {located.label} is a Hugging Face Trainer checkpoint folder; resume it with "
            "trainer.train(resume_from_checkpoint=tracking.integrations.transformers.checkpoint_folder(...)), or "
            "rebuild it with tracking.load(..., mode='train')."
        )
    pairing.unheld(located, {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, "tracking.restore")
    if manifest.kind == SHARDED_KIND:
        state = sharded.load_into(located.store, manifest.files, _where(located), plain, optimizer, strict)
    else:
        # Read on the host, as load does: load_state_dict copies each value to where it belongs.
        read = _read_torch(located, "cpu")
        lightning_state.undescribed_states(located, read)
        state = rebuild.checkpoint_state(located, read)
        if distributed.is_sharded(plain.state_dict()):
            # A whole model's checkpoint (one process's, or DDP's) into an FSDP2 model: every rank keeps its shards.
            sharded.load_whole_into(plain, optimizer, state, strict, where=_where(located))
        else:
            rebuild.load_weights(located, plain, state["model_state"], strict)
            if optimizer is not None and state.get("optim_state") is not None:
                pairing.load_into(located, plain, optimizer, state["optim_state"])
    if scheduler is not None and state.get("scheduler_state") is not None:
        pairing.load_schedulers(located, scheduler, state["scheduler_state"])
    if scaler is not None and state.get("scaler_state") is not None:
        rebuild.load_field(located, "scaler_state", scaler, state["scaler_state"])
    given = dict(optimizer) if isinstance(optimizer, Mapping) else optimizer
    schedulers = dict(scheduler) if isinstance(scheduler, Mapping) else scheduler
    return loaded(located, state, model, given, schedulers, scaler)


def _where(located: Located) -> str:
    return f"run {located.run_id}: {located.label}"


def load_state_dict(
    source: str,
    *,
    checkpoint: Selector | None = None,
    map_location: str | torch.device = "cpu",
    config: TrackingConfig | None = None,
) -> dict[str, torch.Tensor]:
    """The model weights alone: the ``state_dict/`` artifact, or a checkpoint's ``model_state``."""
    check_map_location(map_location)
    located = find_weights(source, checkpoint, config)
    if pretrained.is_folder(located):
        return {k: v.to(map_location) for k, v in pretrained.weights(located).items()}
    # Weights may share the download buffer only when they are all it holds (no optimizer state).
    share = located.manifest.kind == "state_dict"
    state = _read_torch(located, map_location, share=share)
    return dict(_weights(located, state))


def load_model(
    source: str,
    *,
    checkpoint: Selector | None = None,
    map_location: str | torch.device = "cpu",
    mode: str = "eval",
    model: ModelArg = None,
    strict: bool = True,
    config: TrackingConfig | None = None,
) -> nn.Module:
    """The model alone, for evaluation and serving, rebuilt without unpickling code.

    Reads ``state_dict/`` when the run has it and no ``checkpoint`` is asked for,
    else the checkpoint (default: latest).
    """
    _check_mode(mode)
    check_map_location(map_location)
    located = find_weights(source, checkpoint, config)
    check_available(map_location)
    if pretrained.is_folder(located):
        built = pretrained.build_model(located, model, map_location, strict)
        built.train(mode == "train")
        return built
    share = located.manifest.kind == "state_dict"
    # A checkpoint is read on the host: its weights alone go to map_location, by load_state_dict.
    state = _read_torch(located, map_location if share else "cpu", share=share)
    weights = _weights(located, state)
    built = rebuild.build_model(located, model, map_location, weights)
    rebuild.load_weights(located, distributed.unwrap(built), weights, strict, adopt=share)
    built.train(mode == "train")
    return built


def _weights(located: Located, state: Any) -> Any:
    """A read checkpoint's model weights (its ``model_state``, a Lightning one's ``state_dict``), or a state dict."""
    if located.manifest.kind not in CHECKPOINT_KINDS:
        return state
    return rebuild.checkpoint_state(located, state)["model_state"]


def load_pickled_model(
    source: str,
    *,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    config: TrackingConfig | None = None,
) -> nn.Module:
    """The whole pickled model logged by ``log_model`` (what ``torch.save(model)`` stores), in eval mode.

    Unpickling runs arbitrary code from the artifact, so it needs ``trust_pickle=True``.
    """
    if not trust_pickle:
        raise ValueError(
            f"{source}: the whole-model artifact is a pickle, and unpickling can run arbitrary code. "
            "Pass trust_pickle=True if you trust this run, or use tracking.load_model(), which rebuilds "
            "the model from its class and weights without unpickling."
        )
    from mlflow.exceptions import MlflowException

    from tracking.flavor import pytorch_flavor

    # A registry version or logged model ID names the whole model itself; a run, its "model".
    uri = source if source.startswith("models:/") else f"runs:/{resolve_run_id(source, config)}/{layout.MODEL_NAME}"
    try:
        loaded = pytorch_flavor().load_model(uri, map_location=map_location)
    except MlflowException as exc:
        raise NotFoundError(
            f"{source}: no whole model at {uri} ({exc.message}); log one with tracking.log_model(model), "
            "or use tracking.load_model() for checkpoints."
        ) from exc
    except (ModuleNotFoundError, AttributeError) as exc:
        if isinstance(exc, AttributeError) and not str(exc).startswith("Can't get attribute"):
            raise  # not pickle's "the class is not in its module": a bug, with its traceback
        # The pickle names the class by module and name: the code that trained it must be importable here.
        raise NotFoundError(
            f"{source}: the whole model at {uri} is a pickle of a class this process cannot import ({exc}). "
            "Install or put on sys.path the code that defines it (the package that trained it); a checkpoint or "
            "state dict of the run loads without unpickling: tracking.load_model(run_id, model=<an instance>)."
        ) from exc
    loaded.eval()
    return loaded  # type: ignore[no-any-return]


def _read_torch(located: Located, map_location: str | torch.device, share: bool = False) -> Any:
    manifest = located.manifest
    name = located.file
    data = located.read(name)
    if manifest.kind == SHARDED_KIND:
        from tracking.parallel import sharded

        check_available(map_location)
        full = sharded.read_full(located.store, manifest.files, _where(located), named=manifest.optimizers is not None)
        return full if torch.device(map_location).type == "cpu" else to_device(full, map_location)
    try:
        check_available(map_location)
        if manifest.format == "safetensors":
            from safetensors.torch import load as load_safetensors

            return {k: v.to(map_location) for k, v in load_safetensors(bytes(data)).items()}
        if share:
            return zerocopy.load_sharing(data, map_location)
        return torch.load(cast(BinaryIO, BufferReader(data)), map_location=map_location, weights_only=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise rebuild.refused_file(located, name, exc) from None


def _own(value: Any) -> Any:
    """``value`` with every tensor cloned, so that none keeps a shared download buffer alive."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        owned = copy.copy(value)  # keeps the dict's type (OrderedDict, defaultdict's factory)
        for key, item in value.items():
            owned[key] = _own(item)
        return owned
    if isinstance(value, list | tuple):
        items = [_own(v) for v in value]
        return items if isinstance(value, list) else type(value)(items)
    return value


def _check_mode(mode: str) -> None:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
