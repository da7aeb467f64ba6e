"""The MLflow run a training writes to: its params and tags (what it prints about them: :mod:`pipelines.reporting`).

A training without ``--resume`` starts a new run. ``--resume RUN_ID`` restores RUN_ID's checkpoint (which
one, and what is refused: :mod:`pipelines.resume`) at epoch N and goes on in one of two runs:

- By default the resumed run is RUN_ID itself and its metrics go on at step N+1 (tags
  ``tracking.resumed_from_epoch``: N, where its latest resume began, and ``tracking.resumes``: how many).
  An attempt that died after logging an epoch's metrics but before committing that
  epoch's checkpoint leaves those steps behind: they are logged again, MLflow keeps
  both values, and the later one is current. Rewinding a run in place to before its
  latest checkpoint is refused; branch with ``--new-run`` instead.
- ``--new-run`` starts a child run (in RUN_ID's experiment unless ``--experiment``)
  (tags ``mlflow.parentRunId``, ``tracking.resumed_from_run``: RUN_ID, ``tracking.branched_from_epoch``
  and ``tracking.resumed_from_epoch``: N) with the same params; its metrics start at step N+1. Resumed in
  place later, the child keeps its branch point: only ``tracking.resumed_from_epoch`` moves. A run keyed by
  global step (``--checkpoint-every-steps``) also records the step of each:
  ``tracking.branched_from_step`` and ``tracking.resumed_from_step``.

Every run records the number of epochs it trains to in the tag ``tracking.epochs``: a resume without
``--epochs`` goes on to that target, and one with ``--epochs`` sets the new target (in RUN_ID's tag, or the
child's) that later resumes go on to.

Options left out take RUN_ID's params as it last trained with them; given ones that differ are refused unless
``--override`` (how an override is recorded: :mod:`pipelines.override`).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mlflow
import torch
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import tracking
from pipelines import options
from pipelines.override import TAG_OVERRIDE_PREFIX as TAG_OVERRIDE_PREFIX  # re-exported: imported from here
from pipelines.override import TAG_OVERRIDES as TAG_OVERRIDES  # re-exported: imported from here
from pipelines.override import current_params, listed, override_tags
from pipelines.task import State, Task
from pipelines.trainer import Trainer
from tracking import spec
from tracking.cli.noise import muted
from tracking.run import deleted_run_advice

TAG_RESUMED_FROM_RUN = "tracking.resumed_from_run"
# Where the run's latest start from a checkpoint began: a child's branch point until it is resumed in place.
TAG_RESUMED_FROM_EPOCH = "tracking.resumed_from_epoch"
# A --new-run child's epoch of its parent it branched from, set once: its in-place resumes leave it.
TAG_BRANCHED_FROM_EPOCH = "tracking.branched_from_epoch"
# Its parent's global step it branched from, when the parent keys its checkpoints by step (set once too): the
# epoch alone does not name a checkpoint saved in mid-epoch.
TAG_BRANCHED_FROM_STEP = "tracking.branched_from_step"
TAG_RESUMED_FROM_STEP = "tracking.resumed_from_step"
TAG_RESUMES = "tracking.resumes"
# The number of epochs the run trains to: its latest --epochs, which a resume without --epochs goes on to.
TAG_EPOCHS = "tracking.epochs"


# A TrackingError, so that tracking.errors.exit_code reports it like the library's own errors.
class PipelineError(tracking.TrackingError):
    """A run cannot be found, started, resumed or evaluated as asked; the message says why and what to do instead."""


def find_run(client: MlflowClient, source: str, config: tracking.TrackingConfig) -> Run:
    """The live run a run ID, ``runs:/`` or ``models:/`` URI names; :class:`PipelineError` if none."""
    try:
        run = client.get_run(tracking.resolve_run_id(source, config))
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    except MlflowException as exc:
        raise PipelineError(f"{source}: {exc.message}") from exc
    if run.info.lifecycle_stage == "deleted":
        raise PipelineError(_deleted(client, run))
    return run


def _deleted(client: MlflowClient, run: Run) -> str:
    """Why ``run`` (deleted) cannot be resumed, and what to restore (its experiment, when that is deleted)."""
    return f"{deleted_run_advice(client, run.info.run_id, run.info.experiment_id)}, then resume."


def refuse_changes(run_id: str, changed: Mapping[str, tuple[str, str]], override: bool) -> None:
    """Refuse a resume that changes run ``run_id``'s params (name -> (current, given)) without --override."""
    if changed and not override:
        raise PipelineError(
            f"run {run_id} was trained with other params ({listed(changed)}); leave these options out to keep the "
            f"run's values, or add --override to apply them (recorded in the tag {TAG_OVERRIDES})."
        )


def resume_tags(
    origin: Run | None,
    opts: options.Options,
    overrides: Mapping[str, tuple[str, str]],
    epoch: int,
    step: int | None = None,
) -> dict[str, str]:
    """The tags a run records as it starts: its target (``opts.epochs``), the process that trains it
    (:mod:`pipelines.trainer`) and, resumed from ``origin``'s checkpoint
    at ``epoch`` (the epochs it completed; ``step``, its global step, in a run keyed by step), where it goes on
    from: a ``--new-run`` child its parent and branch point, RUN_ID itself where its latest resume began and how
    many there were; and the params this resume changes (:func:`pipelines.override.override_tags`)."""
    # Who trains it from now on: a resume of the run while it is still RUNNING asks whether this process still runs.
    tags = {TAG_EPOCHS: str(opts.epochs), **Trainer.this_process().tag()}
    if origin is None:
        return tags
    tags[TAG_RESUMED_FROM_EPOCH] = str(epoch)
    if step is not None:
        tags[TAG_RESUMED_FROM_STEP] = str(step)
    if opts.new_run:
        parent = origin.info.run_id
        tags.update({MLFLOW_PARENT_RUN_ID: parent, TAG_RESUMED_FROM_RUN: parent, TAG_BRANCHED_FROM_EPOCH: str(epoch)})
        if step is not None:
            tags[TAG_BRANCHED_FROM_STEP] = str(step)
    else:
        recorded = origin.data.tags.get(TAG_RESUMES, "0")
        resumes = (int(recorded) if recorded.isdecimal() else 0) + 1  # a hand-edited tag restarts the count
        tags[TAG_RESUMES] = str(resumes)
    where = f"step {step}" if step is not None else f"epoch {epoch}"
    tags.update(override_tags(where, overrides, origin, opts.new_run))
    return tags


def changed_params(task: Task, opts: options.Options, origin: Run) -> dict[str, tuple[str, str]]:
    """Params this resume changes: name -> (current, new); refused without --override."""
    recorded = current_params(origin)
    changed = opts.conflicts(recorded)
    changed.update({k: (recorded[k], str(v)) for k, v in task.params.items() if recorded.get(k, str(v)) != str(v)})
    refuse_changes(origin.info.run_id, changed, opts.override)
    return changed


def checkpointer(values: Mapping[str, Any], resume_command: str) -> tracking.Checkpointer:
    """The run's checkpoint policy from its settings; ``resume_command`` (with ``{run_id}``) trains it further."""
    # --keep-last all keeps every checkpoint (the best ones among them), and so does --keep-best all: to the
    # Checkpointer, keep_best=None alone means no best kept beside the last ones.
    keep_all = values["keep_last"] is None or values["keep_best"] is None
    return tracking.Checkpointer(
        every_n_epochs=values["checkpoint_every"] or 1,  # none: every_n_steps saves instead
        every_n_steps=values.get("checkpoint_every_steps"),
        keep_last=None if keep_all else values["keep_last"],
        keep_best=None if keep_all else values["keep_best"],
        monitor=values["monitor"],
        mode=values["monitor_mode"],
        # For the run's description in the UI: how to evaluate this run and train it further.
        commands=["python -m pipelines.evaluate --run-id {run_id} --checkpoint best", resume_command],
    )


def log_epoch(
    checkpoints: tracking.Checkpointer, epoch: int, metrics: Mapping[str, float], last: bool, step: int | None = None
) -> None:
    """Log an epoch's metrics (at ``step``, its last global step, in a run saved by steps; else at ``epoch``),
    unless the epoch gets a checkpoint: a checkpoint logs its metrics to the run itself (and to its logged model),
    and logging them here too would show every point twice."""
    if not (last or checkpoints.should_save(epoch, step)):
        mlflow.log_metrics(dict(metrics), step=epoch if step is None else step)


@contextmanager
def start(
    client: MlflowClient,
    config: tracking.TrackingConfig,
    task: Task,
    opts: options.Options,
    origin: Run | None,
    values: Mapping[str, Any],
    overrides: Mapping[str, tuple[str, str]],
    state: State,
) -> Iterator[mlflow.ActiveRun]:
    """The active MLflow run: new, RUN_ID itself, or a child of RUN_ID, with params and tags logged."""
    # A run saved by steps charts by global step, and records the step it was resumed from.
    epoch, step = state.epoch, state.step if values.get("checkpoint_every_steps") is not None else None
    params = {
        "pipeline": task.name,
        "dataset": task.dataset,
        **{name: str(value) for name, value in task.params.items()},
        **opts.params(values),
        **described(state),
    }
    run_args: dict[str, Any]
    if origin is None:
        run_args = {"experiment_id": _experiment_id(client, config.experiment_name)}
    elif opts.new_run:
        experiment_id = _experiment_id(client, opts.experiment) if opts.experiment else origin.info.experiment_id
        run_args = {"experiment_id": experiment_id}
    else:
        run_args = {"run_id": origin.info.run_id}
        # A run's params cannot change: log only those it lacks (options added since it started).
        params = {name: value for name, value in params.items() if name not in origin.data.params}
        _note_relogged(client, origin.info.run_id, epoch, step)
    tags = resume_tags(origin, opts, overrides, epoch, step)
    launch = f"python -m {task.name}"
    if opts.strategy is not None:
        launch = (
            f"torchrun --nproc-per-node {torch.distributed.get_world_size()} -m {task.name} --strategy {opts.strategy}"
        )
    with start_run(**run_args) as run, killed_on_ctrl_c(run, launch, opts.epochs):
        if params:
            mlflow.log_params(params)
        mlflow.set_tags(tags)
        check_store(run.info.run_id, config)
        yield run


def check_store(run_id: str, config: tracking.TrackingConfig) -> None:
    """Fail now, not at the first checkpoint an epoch later, when the run's artifact store cannot be used.

    One listing of a small folder: it meets wrong or missing credentials, a missing bucket and an
    endpoint that is down or no S3 server, each with the store's own error naming the run and path.
    """
    from tracking import layout
    from tracking.run import open_run

    # reuse=True: the first save takes this handle instead of fetching the run again.
    open_run(run_id, config, reuse=True).store.list_files(layout.STATE_DICT_DIR)


def start_run(**run_args: Any) -> mlflow.ActiveRun:
    """``mlflow.start_run(**run_args)``, a new run named from the OS's entropy, Python's RNG state kept.

    A local store (sqlite, a folder) names a new run in this process, from Python's RNG, which the pipeline
    seeded: every run of a seed got the same name.
    """
    seeded = random.getstate()
    random.seed()
    try:
        return mlflow.start_run(**run_args)
    finally:
        random.setstate(seeded)


@contextmanager
def killed_on_ctrl_c(run: mlflow.ActiveRun, launch: str, epochs: int) -> Iterator[None]:
    """Ctrl-C inside ends ``run`` KILLED (MLflow would end it FAILED, and Python print a traceback) and raises a
    KeyboardInterrupt that says so, with ``launch`` (``python -m PIPELINE``) going on to ``epochs``, which
    options.run_pipeline prints in one line."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        run_id = run.info.run_id
        raise KeyboardInterrupt(
            f"interrupted: run {run_id} ended KILLED; `{launch} --resume {run_id} --epochs {epochs}` goes "
            "on from its latest checkpoint."
        ) from None


def described(state: State) -> dict[str, str]:
    """What a reader of the run's params needs to know about the model, optimizer and scheduler."""
    model = spec.describe_model(state.model, None)
    optimizer = spec.describe_optimizer(state.optimizer, state.model)
    params = {
        "model_class": str(model["class"]),
        "model_init_kwargs": json.dumps(model.get("init_kwargs"), sort_keys=True),
        "optimizer_class": str(optimizer["class"]),
        "optimizer_hparams": json.dumps(optimizer["defaults"], sort_keys=True, default=str),
    }
    if state.scheduler is not None:
        scheduler = spec.describe_scheduler(state.scheduler, None)
        params["scheduler_class"] = str(scheduler["class"])
        params["scheduler_kwargs"] = json.dumps(scheduler.get("init_kwargs"), sort_keys=True, default=str)
    return params


def log_final_weights(model: torch.nn.Module, epoch: int, step: int | None = None) -> Any:
    """The model a training ended with at ``epoch``, as its state dict and as the whole model in MLflow's pytorch
    flavor (``mlflow.pytorch.load_model``, serving); MLflow's ``ModelInfo`` of the latter. Each records ``epoch``:
    the state dict in its manifest, the whole model as its step among the run's outputs (MLflow then shows that
    epoch's metrics on it), where ``pipelines.evaluate`` logs their ``eval_*`` metrics. ``step``: the global step it
    ended at, in a run that charts by step (saved by ``--checkpoint-every-steps``); the state dict's manifest records
    it, and ``pipelines.evaluate`` charts both there.

    The whole model is a pickle on purpose: that is what the flavor loads. MLflow warns about it at every save;
    the pipeline silences that and says it once, in :func:`report`, with what it means for loading.
    """
    tracking.log_state_dict(model, epoch=epoch, step=step)
    with muted("mlflow.pytorch", "Saving pytorch model by Pickle"):
        return tracking.log_model(model, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], step=epoch)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another training started at the same moment created it first: use theirs.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"experiment {name!r} is deleted; restore it in the MLflow UI or pass another --experiment."
        )
    return str(experiment.experiment_id)


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    """The last epoch run ``run_id`` logged its metrics at (0: none)."""
    return max((m.step for m in client.get_metric_history(run_id, "val_loss")), default=0)


def _note_relogged(client: MlflowClient, run_id: str, epoch: int, step: int | None) -> None:
    last, at, unit = last_logged_epoch(client, run_id), epoch, "epoch"
    if step is not None:  # charted by global step
        at, unit = step, "step"
    if last > at:
        print(
            f"note: run {run_id} logged metrics up to {unit} {last} but its checkpoint is from {unit} {at}; "
            f"{unit}s {at + 1}..{last} are logged again (MLflow keeps both values; the later is current).",
            file=sys.stderr,
        )
