"""The training loop the pipelines share: an MLflow run, checkpoints, and exact resume.

A pipeline describes its :class:`Task` and hands its command line to :func:`main`.
Every epoch logs ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``
and ``lr`` at ``step=epoch`` (epochs count from 1) and offers a checkpoint to a
:class:`tracking.Checkpointer`; the last epoch always gets one.

``--resume RUN_ID [--from-epoch N]`` restores the model, optimizer, scheduler, global
step and every RNG state (torch, CUDA, numpy, Python and the DataLoader's sampler),
so epochs N+1.. draw the same batches and reach the same weights bit for bit as a
run that never stopped (on CPU; GPU kernels that are not deterministic can differ
in the last bits unless ``torch.use_deterministic_algorithms(True)``).

- By default the resumed run is RUN_ID itself and its metrics go on at step N+1.
  An attempt that died after logging an epoch's metrics but before committing that
  epoch's checkpoint leaves those steps behind: they are logged again, MLflow keeps
  both values, and the later one is current. Rewinding a run in place to before its
  latest checkpoint is refused; branch with ``--new-run`` instead.
- ``--new-run`` starts a child run (in RUN_ID's experiment unless ``--experiment``) (tags ``mlflow.parentRunId``,
  ``tracking.resumed_from_run``, ``tracking.resumed_from_epoch``) with the same params;
  its metrics start at step N+1.

Options left out take RUN_ID's recorded params. Given ones that differ are refused
unless ``--override``, which the tag ``tracking.overrides`` records (a run's params
cannot change, so on the same run they keep their first values).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, TensorDataset

import tracking
from pipelines import data, options
from pipelines.progress import EpochProgress

TAG_RESUMED_FROM_RUN = "tracking.resumed_from_run"
TAG_RESUMED_FROM_EPOCH = "tracking.resumed_from_epoch"
TAG_RESUMES = "tracking.resumes"
TAG_OVERRIDES = "tracking.overrides"


class PipelineError(Exception):
    """A run cannot be started or resumed as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class Task:
    """What a pipeline trains: its data, model, optimizer, schedule and objective."""

    name: str  # the pipeline's module, logged as the run's `pipeline` param
    dataset: str  # a key of pipelines.data.DATASETS, logged as the `dataset` param
    build_model: Callable[[int], nn.Module]  # number of input features -> model
    build_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]  # (parameters, lr)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, labels) -> mean loss
    predict: Callable[[torch.Tensor], torch.Tensor]  # outputs -> labels
    build_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None  # stepped once per epoch
    params: Mapping[str, Any] = field(default_factory=dict)  # fixed hyperparameters, logged as params
    defaults: Mapping[str, Any] = field(default_factory=dict)  # this pipeline's option defaults


@dataclass
class _State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    epoch: int = 0
    step: int = 0


def main(task: Task, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Run a pipeline from its command line; errors print one line to stderr and return 1."""
    opts = options.parse(argv, prog=f"python -m {task.name}", description=description, defaults=task.defaults)
    try:
        train(task, opts)
    except (PipelineError, tracking.TrackingError, MlflowException) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


def train(task: Task, opts: options.Options) -> str:
    """Train a new run, or resume one, as ``opts`` says; returns the run ID."""
    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    origin = _origin(client, task, opts, config) if opts.resume else None
    recorded = origin.data.params if origin else {}
    values = opts.settings(recorded)
    overrides = _overrides(task, opts, origin) if origin else {}
    split = data.load(task.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed(values["seed"])
    generator = torch.Generator().manual_seed(values["seed"])
    if origin:
        state, rng = _restore(task, opts, origin, values, overrides, split, device)
    else:
        state, rng = _build(task, values, split, device), None
    loader = DataLoader(
        TensorDataset(split.x_train, split.y_train), batch_size=values["batch_size"], shuffle=True, generator=generator
    )
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    checkpoints = tracking.Checkpointer(
        every_n_epochs=values["checkpoint_every"],
        keep_last=values["keep_last"],
        keep_best=values["keep_best"],
        monitor=values["monitor"],
        mode=values["monitor_mode"],
    )
    with _run(client, config, task, opts, origin, values, overrides, state.epoch) as run, checkpoints:
        _announce(client, run)
        if rng is not None:
            # Last thing before the loop, so nothing above (MLflow names new runs with `random`) shifts it.
            tracking.restore_rng_state(rng, {"sampler": generator})
        with EpochProgress(state.epoch + 1, opts.epochs) as progress:
            for epoch in range(state.epoch + 1, opts.epochs + 1):
                lr = float(state.optimizer.param_groups[0]["lr"])
                train_loss, train_accuracy = _train_epoch(task, state, loader, device)
                val_loss, val_accuracy = measure(task, state.model, x_val, y_val)
                metrics = {
                    "train_loss": train_loss,
                    "train_accuracy": train_accuracy,
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                    "lr": lr,
                }
                mlflow.log_metrics(metrics, step=epoch)
                progress.update(epoch, metrics)
                checkpoints.save(
                    state.model,
                    state.optimizer,
                    epoch=epoch,
                    metrics=metrics,
                    scheduler=state.scheduler,
                    step=state.step,
                    extra={"rng": tracking.capture_rng_state({"sampler": generator})},
                    force=epoch == opts.epochs,
                )
        tracking.log_state_dict(state.model)
        return str(run.info.run_id)


@torch.no_grad()
def measure(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on ``(x, y)`` in eval mode (no dropout, batch norm's running stats)."""
    model.eval()
    outputs = model(x)
    return task.loss(outputs, y).item(), (task.predict(outputs) == y).float().mean().item()


def find_run(client: MlflowClient, source: str, config: tracking.TrackingConfig) -> Run:
    """The live run a run ID, ``runs:/`` or ``models:/`` URI names; :class:`PipelineError` if none."""
    try:
        run = client.get_run(tracking.resolve_run_id(source, config))
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    except MlflowException as exc:
        raise PipelineError(f"{source}: {exc.message}") from exc
    if run.info.lifecycle_stage == "deleted":
        raise PipelineError(f"run {run.info.run_id} is deleted; restore it in the MLflow UI first.")
    return run


def _train_epoch(task: Task, state: _State, loader: DataLoader[Any], device: torch.device) -> tuple[float, float]:
    state.model.train()
    # Summed on the device, read once per epoch: .item() per batch would sync a GPU every step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        state.optimizer.zero_grad()
        outputs = state.model(x)
        loss = task.loss(outputs, y)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        loss_sum += loss.detach() * len(y)
        correct += (task.predict(outputs) == y).sum()
        seen += len(y)
    if state.scheduler is not None:
        state.scheduler.step()
    return loss_sum.item() / seen, correct.item() / seen


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA too


def _build(task: Task, values: Mapping[str, Any], split: data.Split, device: torch.device) -> _State:
    model = task.build_model(split.n_features).to(device)
    optimizer = task.build_optimizer(model.parameters(), values["lr"])
    scheduler = task.build_scheduler(optimizer) if task.build_scheduler else None
    return _State(model, optimizer, scheduler)


def _origin(client: MlflowClient, task: Task, opts: options.Options, config: tracking.TrackingConfig) -> Run:
    """The run to resume, once checked that this pipeline can resume it as asked."""
    assert opts.resume is not None
    run = find_run(client, opts.resume, config)
    run_id, params = run.info.run_id, run.data.params
    if params.get("dataset", task.dataset) != task.dataset:
        raise PipelineError(
            f"run {run_id} was trained by {params.get('pipeline', 'another pipeline')} on {params['dataset']}, "
            f"not by {task.name} on {task.dataset}; resume it with `python -m {params.get('pipeline')}`."
        )
    if opts.from_epoch is not None and not opts.new_run:
        latest = max((m.epoch or 0 for m in tracking.list_checkpoints(run_id, config=config)), default=0)
        if opts.from_epoch < latest:
            raise PipelineError(
                f"run {run_id} has checkpoints up to epoch {latest}; continuing it from epoch "
                f"{opts.from_epoch} would rewrite its later history. Add --new-run to branch a child run "
                f"from epoch {opts.from_epoch}."
            )
    return run


def _overrides(task: Task, opts: options.Options, origin: Run) -> dict[str, tuple[str, str]]:
    """Params this resume changes: name -> (recorded, new); refused without --override."""
    recorded = origin.data.params
    changed = opts.conflicts(recorded)
    changed.update({k: (recorded[k], str(v)) for k, v in task.params.items() if recorded.get(k, str(v)) != str(v)})
    if changed and not opts.override:
        listed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        raise PipelineError(
            f"run {origin.info.run_id} was trained with other params ({listed}); leave these options out "
            f"to keep the run's values, or add --override to apply them (recorded in the tag {TAG_OVERRIDES})."
        )
    return changed


def _restore(
    task: Task,
    opts: options.Options,
    origin: Run,
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    split: data.Split,
    device: torch.device,
) -> tuple[_State, dict[str, Any]]:
    run_id = origin.info.run_id
    try:
        loaded = tracking.load(
            run_id,
            "latest" if opts.from_epoch is None else opts.from_epoch,
            mode="train",
            map_location=device,
            model=lambda: task.build_model(split.n_features),
            optimizer=lambda parameters: task.build_optimizer(parameters, values["lr"]),
            scheduler=task.build_scheduler,
        )
    except tracking.MismatchError as exc:
        raise PipelineError(f"cannot resume: {task.name} builds a different model than the one logged. {exc}") from exc
    epoch = loaded.epoch or 0
    if epoch >= opts.epochs:
        raise PipelineError(
            f"run {run_id} ({origin.info.status}) already reached epoch {epoch} and --epochs is "
            f"{opts.epochs}; pass --epochs greater than {epoch} to train further."
        )
    if loaded.optimizer is None or "rng" not in loaded.extra:
        raise PipelineError(
            f"run {run_id}: {loaded.path} holds no optimizer or RNG state, so it cannot be resumed exactly; "
            "resume a checkpoint logged by a training pipeline."
        )
    if "lr" in overrides:
        # load_state_dict brought back the run's learning rate; the override applies from here on.
        for group in loaded.optimizer.param_groups:
            group["lr"] = values["lr"]
        if loaded.scheduler is not None:
            loaded.scheduler.base_lrs = [values["lr"]] * len(loaded.optimizer.param_groups)
    state = _State(loaded.model, loaded.optimizer, loaded.scheduler, epoch, loaded.step or 0)
    return state, loaded.extra["rng"]


@contextmanager
def _run(
    client: MlflowClient,
    config: tracking.TrackingConfig,
    task: Task,
    opts: options.Options,
    origin: Run | None,
    values: Mapping[str, Any],
    overrides: Mapping[str, tuple[str, str]],
    epoch: int,
) -> Iterator[mlflow.ActiveRun]:
    """The active MLflow run: new, RUN_ID itself, or a child of RUN_ID, with params and tags logged."""
    params = {
        "pipeline": task.name,
        "dataset": task.dataset,
        **{name: str(value) for name, value in task.params.items()},
        **{name: options.param_value(values[name]) for name in options.RECORDED},
    }
    tags: dict[str, str] = {}
    start: dict[str, Any]
    if origin is None:
        start = {"experiment_id": _experiment_id(client, config.experiment_name)}
    elif opts.new_run:
        parent = origin.info.run_id
        experiment_id = _experiment_id(client, opts.experiment) if opts.experiment else origin.info.experiment_id
        start = {"experiment_id": experiment_id}
        tags = {MLFLOW_PARENT_RUN_ID: parent, TAG_RESUMED_FROM_RUN: parent, TAG_RESUMED_FROM_EPOCH: str(epoch)}
    else:
        start = {"run_id": origin.info.run_id}
        # A run's params cannot change: log only those it lacks (options added since it started).
        params = {name: value for name, value in params.items() if name not in origin.data.params}
        resumes = int(origin.data.tags.get(TAG_RESUMES, "0")) + 1
        tags = {TAG_RESUMED_FROM_EPOCH: str(epoch), TAG_RESUMES: str(resumes)}
        _note_relogged(client, origin.info.run_id, epoch)
    if overrides:
        note = f"from epoch {epoch}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in overrides.items())
        earlier = origin.data.tags.get(TAG_OVERRIDES) if origin and not opts.new_run else None
        tags[TAG_OVERRIDES] = f"{earlier}; {note}" if earlier else note
    with mlflow.start_run(**start) as run:
        if params:
            mlflow.log_params(params)
        if tags:
            mlflow.set_tags(tags)
        yield run


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return str(client.create_experiment(name))
    if experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"experiment {name!r} is deleted; restore it in the MLflow UI or pass another --experiment."
        )
    return str(experiment.experiment_id)


def _note_relogged(client: MlflowClient, run_id: str, epoch: int) -> None:
    last = max((m.step for m in client.get_metric_history(run_id, "val_loss")), default=0)
    if last > epoch:
        print(
            f"note: run {run_id} logged metrics up to epoch {last} but its checkpoint is from epoch {epoch}; "
            f"epochs {epoch + 1}..{last} are logged again (MLflow keeps both values; the later is current).",
            file=sys.stderr,
        )


def _announce(client: MlflowClient, run: mlflow.ActiveRun) -> None:
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    print(f"MLflow run {run_id} (experiment {experiment_id})", flush=True)
    uri = str(client.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"view it at {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}", flush=True)
