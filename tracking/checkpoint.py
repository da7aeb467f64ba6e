"""Writing resumable checkpoints to an MLflow run.

Where each file goes is :mod:`tracking.layout`'s business, and how a checkpoint is committed
:mod:`tracking.commit`'s; this module decides what goes in the checkpoint. The model alone
(its state dict, the whole model) is :mod:`tracking.model_logs`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, Literal, overload

from torch import nn

from tracking import layout, optimizers, spec
from tracking.catalog import LoggedCheckpoint
from tracking.commit import CheckpointSnapshot, commit_checkpoint
from tracking.config import TrackingConfig
from tracking.manifest import SHARDED_KIND, Manifest, now, versions
from tracking.metrics import check_metrics
from tracking.optimizers import Optimizers
from tracking.parallel import distributed
from tracking.parallel.collective import commit
from tracking.payload import check_int64, check_loadable, check_model
from tracking.run import RunHandle, open_run, target_run_id
from tracking.saver import background_saver, raise_background_errors

# log_checkpoint's monitor when none is given and the metrics have it (minimised, as the Checkpointer does).
DEFAULT_MONITOR = "val_loss"


@overload
def log_checkpoint(
    model: nn.Module,
    optimizer: Optimizers | None = None,
    *,
    epoch: int,
    step: int | None = None,
    keyed_by: str = layout.EPOCH,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_state: Any = None,
    monitor: str | None = None,
    mode: str = "min",
    model_kwargs: Mapping[str, Any] | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    chart_step: int | None = None,
    run_id: str | None = None,
    config: TrackingConfig | None = None,
    blocking: Literal[True] = True,
) -> LoggedCheckpoint: ...


@overload
def log_checkpoint(
    model: nn.Module,
    optimizer: Optimizers | None = None,
    *,
    epoch: int,
    step: int | None = None,
    keyed_by: str = layout.EPOCH,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_state: Any = None,
    monitor: str | None = None,
    mode: str = "min",
    model_kwargs: Mapping[str, Any] | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    chart_step: int | None = None,
    run_id: str | None = None,
    config: TrackingConfig | None = None,
    blocking: Literal[False],
) -> Future[LoggedCheckpoint]: ...


def log_checkpoint(
    model: nn.Module,
    optimizer: Optimizers | None = None,
    *,
    epoch: int,
    step: int | None = None,
    keyed_by: str = layout.EPOCH,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_state: Any = None,
    monitor: str | None = None,
    mode: str = "min",
    model_kwargs: Mapping[str, Any] | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    chart_step: int | None = None,
    run_id: str | None = None,
    config: TrackingConfig | None = None,
    blocking: bool = True,
) -> LoggedCheckpoint | Future[LoggedCheckpoint]:
    """Log a resumable checkpoint as a logged model of the run: ``checkpoint.pt``, then its manifest.

    ``checkpoint.pt`` is a plain dict that ``torch.load(f, weights_only=True)`` reads back
    (``epoch``, ``model_state``, ``optim_state``) plus ``scheduler_state``, ``scaler_state``, ``step``, ``metrics``
    and any ``extra`` keys (tensors and plain Python values only). The manifest is
    written last, then the model is marked READY; the run's ``latest`` tag (and ``best``, when
    ``monitor`` is given) move only then, and ``metrics`` are logged against the model and the
    run at step = ``epoch`` (``chart_step``, when given: a loop that saves in mid-epoch charts by its
    global step), as ``mlflow.log_metrics(..., model_id=)`` does: do not log them again.
    ``keyed_by="step"`` keys the checkpoint by ``step`` instead of ``epoch`` (a training that saves
    every N steps): its name, "latest" and ``checkpoint=<int>`` then go by step, in a run whose
    checkpoints are all keyed so.
    Without ``monitor``, metrics holding ``val_loss`` make it the monitor (with ``mode``, "min").
    The result's ``uri`` (``models:/<model_id>``) loads exactly this checkpoint.

    ``optimizer`` is one optimizer, or a mapping of names to optimizers (a GAN's generator and
    discriminator): ``optim_state`` is then ``{name: state_dict()}``. ``scheduler`` then maps names
    too, each scheduler under the name of the optimizer it drives (``scheduler_kwargs`` likewise);
    a name that is not a non-empty string or a value of the wrong type is refused, naming the key,
    before anything is stored, and so is a scheduler without the optimizer it drives (a load
    rebuilds a scheduler over its optimizer: stored alone, its state would load as nothing).

    With ``blocking=False`` the call returns once the state is copied to host memory
    and the upload runs in the background (one at a time, in order); the returned
    future holds the result, and :func:`wait_for_checkpoints` flushes them all.

    Under ``torchrun`` (an initialised process group) every rank calls it: rank 0 alone talks
    to MLflow and writes the checkpoint of a replicated (DDP) model; every rank writes its own
    shards of a sharded (FSDP2, DTensor) one, through ``torch.distributed.checkpoint``. Every
    rank returns once the checkpoint is committed, or raises the same error. ``rank_state`` is
    this rank's own state to keep (its RNG and data-sampler states): the checkpoint stores every
    rank's under ``"rank_state"``, and :func:`tracking.restore` gives each rank back its own.
    """
    if monitor is None and isinstance(metrics, Mapping) and DEFAULT_MONITOR in metrics:
        # What the Checkpointer ranks by, so that checkpoint="best" works for the common case.
        monitor = DEFAULT_MONITOR
    snapshot = snapshot_checkpoint(
        model,
        optimizer,
        epoch=epoch,
        step=step,
        keyed_by=keyed_by,
        scheduler=scheduler,
        scaler=scaler,
        metrics=metrics,
        extra=extra,
        rank_state=rank_state,
        monitor=monitor,
        mode=mode,
        model_kwargs=model_kwargs,
        scheduler_kwargs=scheduler_kwargs,
        chart_step=chart_step,
    )
    # Only rank 0 talks to MLflow (the other ranks may have no active run); its error is raised on every rank.
    handle, refused = distributed.lead(lambda: open_run(target_run_id(run_id), config, reuse=True))
    # A background save that failed unnoticed fails this save, whichever kind it is.
    raise_background_errors()
    if blocking:
        return _commit(handle, snapshot, config, refused)
    host = snapshot.to_host()
    distributed.prepare()
    return background_saver().submit(
        distributed.in_background(lambda: _commit(handle, host, config, refused), saving_label(handle, host))
    )


def _commit(
    handle: RunHandle | None, snapshot: CheckpointSnapshot, config: TrackingConfig | None, refused: Exception | None
) -> LoggedCheckpoint:
    if snapshot.manifest.kind == SHARDED_KIND or distributed.active():
        return commit(handle, snapshot, config=config, refused=refused)
    assert handle is not None
    return commit_checkpoint(handle, snapshot)


def saving_label(handle: RunHandle | None, snapshot: CheckpointSnapshot) -> str:
    """How messages name the checkpoint ``snapshot`` becomes: ``run <ID>: the checkpoint of epoch 7`` (on rank 0)."""
    manifest = snapshot.manifest
    named = f"the checkpoint of {layout.label(manifest.keyed_by, manifest.key)}"
    return f"run {handle.run_id}: {named}" if handle is not None else named


def snapshot_checkpoint(
    model: nn.Module,
    optimizer: Optimizers | None,
    *,
    epoch: int,
    step: int | None = None,
    keyed_by: str = layout.EPOCH,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_state: Any = None,
    monitor: str | None = None,
    mode: str = "min",
    model_kwargs: Mapping[str, Any] | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    chart_step: int | None = None,
) -> CheckpointSnapshot:
    """Validate the arguments and gather the checkpoint dict and its manifest (no I/O).

    A model wrapped in ``DistributedDataParallel`` is saved as the module it wraps; one whose
    state holds DTensors (FSDP2) makes a sharded checkpoint, its state dicts keyed by name.
    """
    check_model(model)
    model = distributed.unwrap(model)
    optimizers.check(optimizer, scheduler, scheduler_kwargs)
    epoch = check_int64("epoch", epoch)
    step = None if step is None else check_int64("step", step)
    chart_step = None if chart_step is None else check_int64("chart_step", chart_step)
    if keyed_by not in layout.KEYS or (keyed_by == layout.STEP and step is None):
        raise ValueError(f"keyed_by must be 'epoch', or 'step' with step= given; got {keyed_by!r}, step={step!r}")
    if mode not in layout.MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    clean_metrics = check_metrics(metrics)
    if monitor is not None and monitor not in clean_metrics:
        raise ValueError(
            f"monitor metric {monitor!r} is not in metrics {sorted(clean_metrics)}; pass it in metrics=..."
        )
    model_state = model.state_dict()
    optim_state: Any
    sharded = distributed.is_sharded(model_state)
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_state = get_model_state_dict(model)
        optim_state = optimizers.each(optimizer, lambda one: get_optimizer_state_dict(model, one))
    else:
        optim_state = optimizers.each(optimizer, lambda one: one.state_dict())
    payload: dict[str, Any] = {
        "epoch": epoch,
        "model_state": model_state,
        "optim_state": optim_state,
        "step": step,
        "metrics": clean_metrics,
    }
    if scheduler is not None:
        payload["scheduler_state"] = optimizers.each(scheduler, lambda one: one.state_dict())
    if scaler is not None:
        payload["scaler_state"] = scaler.state_dict()
    reserved = set(payload) | {"scheduler_state", "scaler_state", layout.RANK_STATE}
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"extra keys must be strings, got {key!r}")
        if key in reserved:
            raise ValueError(f"extra key {key!r} clashes with a checkpoint key; rename it")
        check_loadable(value, f"extra[{key!r}]")
        payload[key] = value
    check_loadable(rank_state, "rank_state")
    if rank_state is not None:
        if sharded:
            # Each rank writes its own entry; in a sharded checkpoint they sit side by side by rank.
            payload[layout.RANK_STATE] = {str(distributed.rank()): rank_state}
        elif not distributed.active():
            payload[layout.RANK_STATE] = [rank_state]  # else gathered from every rank when committed
    # What torch hands over (state dicts of custom modules, optimizers, schedulers) must load too.
    check_loadable(payload, "the checkpoint")
    manifest = Manifest(
        kind=SHARDED_KIND if sharded else "checkpoint",
        format="dcp" if sharded else "torch",
        files={},
        model=spec.describe_model(model, model_kwargs),
        epoch=epoch,
        step=step,
        keyed_by=keyed_by,
        metrics=clean_metrics,
        **optimizers.describe(model, optimizer, scheduler, scheduler_kwargs),
        scaler={"class": spec.class_path(scaler)} if scaler is not None else None,
        extra_keys=sorted(extra or {}),
        versions=versions(),
        created_at=now(),
    )
    if distributed.rank() != 0 and not sharded:
        # Rank 0 writes a replicated model's checkpoint; the other ranks only hand it their rank_state.
        payload = {}
    return CheckpointSnapshot(payload, manifest, monitor, mode, None if sharded else rank_state, chart_step)
