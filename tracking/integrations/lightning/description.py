"""How a Lightning save is described: what the main thread knows at the save, and the manifest made of it.

The commit may run in another thread (the background saver, or Lightning's ``AsyncCheckpointIO``),
so the trainer's metrics and the module's, optimizer's and scheduler's descriptions are taken at the
save, on the main thread, and the manifest is made from them. A fit whose ``ModelCheckpoint`` saves
by step keys its checkpoints by global step, any other by epoch (:func:`keying`).

A module of several optimizers (a GAN's, with manual optimization) has them described by name, as the core
describes ``log_checkpoint(optimizer={name: ...})``'s: Lightning names none, so each is named by its index in
``trainer.optimizers`` (the order ``configure_optimizers`` returns them in, and ``optimizer_states``'s): "0",
"1", ...; each LR scheduler is named as the optimizer it drives, with its index in ``lr_schedulers``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.progress import _ProcessedTracker
from lightning.pytorch.trainer.states import TrainerStatus

from tracking import layout, spec
from tracking.manifest import FORMAT_VERSION, NAMED_OPTIMIZERS_VERSION, Manifest, now, versions
from tracking.metrics import renamed
from tracking.payload import check_loadable

FORMAT = "lightning"

# Lightning keys that the core maps onto its own (see tracking.rebuild.checkpoint_state).
_MAPPED = ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step")

# What Lightning's MLFlowLogger removes from a metric's name (lightning.pytorch.loggers.mlflow).
_NOT_IN_MLFLOW_NAMES = re.compile("[^a-zA-Z0-9_/. -]+")


@dataclass(frozen=True)
class SaveContext:
    """What the main thread knows at a save, for the commit that may run in another thread."""

    metrics: dict[str, float]
    model: dict[str, Any]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    chart_step: int
    # Several optimizers and their schedulers by name (their index), in place of optimizer and scheduler.
    optimizers: dict[str, dict[str, Any]] | None = None
    schedulers: dict[str, dict[str, Any]] | None = None


def save_context(trainer: pl.Trainer, module: pl.LightningModule) -> SaveContext:
    """The trainer's finite metrics and the module's, optimizers' and schedulers' descriptions, now."""
    several = len(trainer.optimizers) > 1
    return SaveContext(
        metrics=_finite_metrics(trainer.callback_metrics),
        model=_describe_module(module),
        optimizer=spec.describe_optimizer(trainer.optimizers[0], module) if len(trainer.optimizers) == 1 else None,
        scheduler=None if several else _describe_scheduler(trainer),
        chart_step=logger_step(trainer),
        optimizers=_describe_optimizers(trainer, module) if several else None,
        schedulers=_describe_schedulers(trainer) if several else None,
    )


def keying(trainer: pl.Trainer) -> str:
    """``"step"`` when one of the trainer's ModelCheckpoints saves by step, else ``"epoch"``.

    Saves by step (``every_n_train_steps``, ``train_time_interval``, or after each of several validations
    an epoch, ``val_check_interval``) come several an epoch: keyed by epoch, each would replace the one
    before. The fit's every checkpoint takes this key, those its epoch-driven ModelCheckpoints write too,
    because a run holds one kind of key.
    """
    several = _validates_mid_epoch(trainer)
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        # Lightning keeps its triggers as set (every_n_epochs defaults to 0 once a step trigger is given).
        if callback._every_n_train_steps >= 1 or callback._train_time_interval is not None:
            return layout.STEP
        # Unless told to save at the training epoch's end, ModelCheckpoint then saves after each validation.
        if several and callback._save_on_train_epoch_end is not True:
            return layout.STEP
    return layout.EPOCH


def _validates_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether validation may run before an epoch's end: ``val_check_interval`` a fraction below 1, a number
    of batches or a time, or ``check_val_every_n_epoch=None``."""
    if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch is None:
        return True
    # As ModelCheckpoint tells (1 and 1.0 alike: once an epoch, at its end).
    return bool(trainer.val_check_interval != 1.0)


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers chart the metrics known now at: a checkpoint saved now charts its metrics there.

    Not ``trainer.global_step``: the loggers count the batches that stepped (``global_step`` counts
    optimizer steps, several a batch with several optimizers), and chart a batch's metrics, and the
    epoch's, before that batch counts (``_LoggerConnector.log_metrics``; ``_FitLoop.on_advance_end``
    steps the count back one for the epoch's metrics). A save at global step 8 charts at step 7,
    whether ModelCheckpoint saved at the end of validation or of the training epoch.
    """
    loop = trainer.fit_loop
    counted = loop.epoch_loop._batches_that_stepped
    epoch = cast(_ProcessedTracker, loop.epoch_progress.current)  # typed as its base, as Lightning's fit loop reads it
    # From the epoch's end hooks on (and after fit), the epoch's last batch has been counted already.
    last_batch_counted = epoch.processed > epoch.completed or trainer.state.status != TrainerStatus.RUNNING
    return max(counted - 1, 0) if last_batch_counted else counted


HYPERPARAMETERS_FIX = (
    "Lightning saves the module's and the datamodule's hyperparameters as they are: keep them to plain values, "
    "or leave such an argument out with save_hyperparameters(ignore=[...])."
)


def check_hyperparameters(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Raise ValueError, naming the key, when the hyperparameters Lightning puts in every checkpoint (the module's,
    the datamodule's) would not load with ``torch.load(weights_only=True)``: said as a fit starts, not at its first
    save, after an epoch of training."""
    datamodule = getattr(trainer, "datamodule", None)
    for key, owner in (("hyper_parameters", module), ("datamodule_hyper_parameters", datamodule)):
        hparams = getattr(owner, "hparams", None)
        if hparams:
            check_loadable(dict(hparams), f"the Lightning checkpoint[{key!r}]")


def save_manifest(
    checkpoint: dict[str, Any], epoch: int, step: int, context: SaveContext, keyed_by: str = layout.EPOCH
) -> Manifest:
    """The manifest of the checkpoint Lightning saved at ``epoch`` and ``step`` (format ``"lightning"``), keyed
    by ``keyed_by`` (``"epoch"`` or ``"step"``)."""
    saves_optimizers, saves_schedulers = bool(checkpoint.get("optimizer_states")), bool(checkpoint.get("lr_schedulers"))
    named = context.optimizers is not None and saves_optimizers
    return Manifest(
        kind="checkpoint",
        files={},
        model=context.model,
        epoch=epoch,
        step=step,
        keyed_by=keyed_by,
        metrics=context.metrics,
        optimizer=context.optimizer if saves_optimizers else None,
        scheduler=context.scheduler if saves_schedulers else None,
        optimizers=context.optimizers if saves_optimizers else None,
        schedulers=context.schedulers if saves_schedulers and named else None,
        extra_keys=sorted(k for k in checkpoint if k not in _MAPPED),
        format=FORMAT,
        versions={**versions(), "lightning": lightning.__version__},
        created_at=now(),
        # Names are read from this version on: a reader before them refuses the checkpoint, where it would
        # otherwise rebuild no optimizer from it.
        format_version=NAMED_OPTIMIZERS_VERSION if named else FORMAT_VERSION,
    )


def weights_only(manifest: Manifest) -> bool:
    """Whether a Lightning checkpoint holds the weights alone (``ModelCheckpoint(save_weights_only=True)``):
    Lightning then leaves out the optimizers' and the callbacks' states, and no fit resumes from it."""
    no_optimizer = manifest.optimizer is None and manifest.optimizers is None
    return manifest.format == FORMAT and no_optimizer and "callbacks" not in manifest.extra_keys


def saves_weights_only(checkpoint: Mapping[str, Any]) -> bool:
    """Whether Lightning's ``checkpoint`` holds the weights alone (as :func:`weights_only` tells of its manifest)."""
    return not checkpoint.get("optimizer_states") and "callbacks" not in checkpoint


def save_monitor(
    trainer: pl.Trainer, path: str, manifest: Manifest, monitor: str | None, mode: str
) -> tuple[str | None, str]:
    """The metric and mode that rank the checkpoint at ``path``: ``monitor`` and ``mode`` when a monitor is
    given, else those of the ModelCheckpoint that wrote it (the metric only when the metrics hold it)."""
    if monitor is not None:
        monitor = metric_key(monitor)
        return (monitor if monitor in manifest.metrics else None), mode
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    file, folder = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
    # A ModelCheckpoint records the file it saves before saving it (among its top k, or as its last): that
    # names the writer also when several share a folder (the trainer's default one, say).
    writer = next(
        (
            c
            for c in callbacks
            if file in {os.path.realpath(str(p)) for p in [*c.best_k_models, c.last_model_path] if p}
        ),
        None,
    ) or next(
        (c for c in callbacks if c.dirpath and os.path.realpath(str(c.dirpath)) == folder),
        callbacks[0] if callbacks else None,
    )
    if writer is None or writer.monitor is None or metric_key(writer.monitor) not in manifest.metrics:
        return None, "min"
    return metric_key(writer.monitor), writer.mode


def metric_key(name: str) -> str:
    """The key Lightning's MLFlowLogger logs metric ``name`` by (``acc@1`` as ``acc1``): a checkpoint's metrics
    take it, so that MLflow accepts them and they chart with the logger's."""
    return _NOT_IN_MLFLOW_NAMES.sub("", name)


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue  # a tensor of several values
        if math.isfinite(number):
            out[str(name)] = number
    return renamed(out, metric_key)


def _describe_module(module: pl.LightningModule) -> dict[str, Any]:
    """The LightningModule's class, with its saved hyperparameters as its init arguments."""
    hparams = dict(module.hparams) if module.hparams else None
    if hparams is not None and spec.is_json(hparams):
        return {"class": spec.class_path(type(module)), "init_kwargs": hparams, "init_kwargs_source": "hparams"}
    described = spec.describe_model(module, None)
    if hparams is not None:
        described["note"] = (
            "its saved hyperparameters are not JSON-serialisable; to load, pass model=<instance or factory>"
        )
    return described


def _describe_scheduler(trainer: pl.Trainer) -> dict[str, Any] | None:
    configs = trainer.lr_scheduler_configs
    if not configs:
        return None
    try:
        return spec.describe_scheduler(configs[0].scheduler, None)
    except Exception:  # a scheduler whose arguments cannot be read back: the loader leaves it out
        return {"class": spec.class_path(configs[0].scheduler), "init_kwargs": None}


def _describe_optimizers(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    described = {}
    for index, optimizer in enumerate(trainer.optimizers):
        try:
            described[str(index)] = spec.describe_optimizer(optimizer, module)
        except ValueError as exc:
            raise ValueError(f"optimizer {index} of {type(module).__name__}.configure_optimizers: {exc}") from None
    return described


def _describe_schedulers(trainer: pl.Trainer) -> dict[str, dict[str, Any]] | None:
    """Each optimizer's LR scheduler, under the optimizer's name, with its index in the checkpoint's
    ``lr_schedulers`` (the loader's only way to tell which state is whose). Of several schedulers of one
    optimizer, the first, as with one optimizer."""
    indices = {id(optimizer): str(index) for index, optimizer in enumerate(trainer.optimizers)}
    described: dict[str, dict[str, Any]] = {}
    for position, config in enumerate(trainer.lr_scheduler_configs):
        name = indices.get(id(getattr(config.scheduler, "optimizer", None)))
        if name is None or name in described:
            continue
        try:
            description = spec.describe_scheduler(config.scheduler, None)
        except Exception:  # arguments that cannot be read back: the loader leaves it out
            description = {"class": spec.class_path(config.scheduler), "init_kwargs": None}
        described[name] = {**description, layout.LR_SCHEDULERS_INDEX: position}
    return described or None
