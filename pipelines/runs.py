"""The MLflow run a training writes to, and what a resume of one refuses or restores.

A training without ``--resume`` starts a new run. ``--resume RUN_ID [--from-epoch N]``
restores RUN_ID's checkpoint (the latest, or epoch N; a checkpoint's ``models:/`` URI as RUN_ID picks that
one) and goes on in one of two runs:

- By default the resumed run is RUN_ID itself and its metrics go on at step N+1.
  An attempt that died after logging an epoch's metrics but before committing that
  epoch's checkpoint leaves those steps behind: they are logged again, MLflow keeps
  both values, and the later one is current. Rewinding a run in place to before its
  latest checkpoint is refused; branch with ``--new-run`` instead.
- ``--new-run`` starts a child run (in RUN_ID's experiment unless ``--experiment``)
  (tags ``mlflow.parentRunId``, ``tracking.resumed_from_run``,
  ``tracking.resumed_from_epoch``) with the same params; its metrics start at step N+1.

Options left out take RUN_ID's params as it last trained with them. Given ones that
differ are refused unless ``--override``. A run's params cannot change, so an override
on RUN_ID itself is kept in tags: ``tracking.override.<param>`` holds the value its
later resumes go on with, and ``tracking.overrides`` tells what changed from where.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import mlflow
import torch
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import tracking
from pipelines import data, options
from pipelines.task import State, Task
from tracking import layout, spec
from tracking.cli.noise import muted

TAG_RESUMED_FROM_RUN = "tracking.resumed_from_run"
TAG_RESUMED_FROM_EPOCH = "tracking.resumed_from_epoch"
TAG_RESUMED_FROM_STEP = "tracking.resumed_from_step"
TAG_RESUMES = "tracking.resumes"
TAG_OVERRIDES = "tracking.overrides"
# tracking.override.lr = "0.5": the value of param lr since an --override on the run itself.
TAG_OVERRIDE_PREFIX = "tracking.override."


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
        raise PipelineError(f"run {run.info.run_id} is deleted; restore it in the MLflow UI first.")
    return run


def pinned(opts: options.Options, config: tracking.TrackingConfig) -> options.Options:
    """``opts`` with a ``--resume models:/...`` that names one checkpoint (its logged model, or a registry version
    made from it) as ``--resume RUN_ID --from-epoch N`` (``--from-step N``): its run, from exactly that checkpoint."""
    if opts.resume is None or not opts.resume.strip().startswith("models:/"):
        return opts
    try:
        located = tracking.find_checkpoint(opts.resume, config=config)
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    kind, key = located.manifest.keyed_by, located.manifest.key
    run_id = located.run_id
    if opts.from_epoch is not None or opts.from_step is not None:
        flag = "--from-epoch" if opts.from_epoch is not None else "--from-step"
        raise PipelineError(
            f"{opts.resume} names one checkpoint already ({layout.label(kind, key)} of run {run_id}), and "
            f"{flag} picks among a run's: leave {flag} out, or pass --resume {run_id} with it."
        )
    return replace(
        opts,
        resume=run_id,
        from_epoch=key if kind == layout.EPOCH else None,
        from_step=key if kind == layout.STEP else None,
    )


def find_origin(client: MlflowClient, task: Task, opts: options.Options, config: tracking.TrackingConfig) -> Run:
    """The run to resume, once checked that this pipeline can resume it as asked."""
    assert opts.resume is not None
    run = find_run(client, opts.resume, config)
    run_id, params = run.info.run_id, run.data.params
    if params.get("dataset", task.dataset) != task.dataset or params.get("pipeline", task.name) != task.name:
        pipeline = params.get("pipeline")
        raise PipelineError(
            f"run {run_id} was trained by {pipeline or 'another pipeline'} on {params.get('dataset', 'other data')}, "
            f"not by {task.name} on {task.dataset}; "
            + (f"resume it with `python -m {pipeline}`." if pipeline else "train a new run instead.")
        )
    check_pick(run_id, opts, config, run.data.tags)
    return run


def check_pick(
    run_id: str, opts: options.Options, config: tracking.TrackingConfig, tags: Mapping[str, str] | None = None
) -> None:
    """Refuse to resume a run with no checkpoint, a ``--from-epoch`` in a run keyed by step (or ``--from-step``
    in one keyed by epoch), and a pick before the run's latest checkpoint when it would continue in place: that
    would rewrite its later history. ``tags``, the run's: a pick from before a ``--new-run`` child branched is
    said to be its parent's."""
    saved = tracking.list_checkpoints(run_id, config=config)
    keys = [c.key for c in saved if c.key is not None]
    if not keys:
        try:
            tracking.find_checkpoint(run_id, config=config)  # a run of the layout before logged models says so
        except tracking.NotFoundError:
            raise PipelineError(
                f"run {run_id} has no committed checkpoint to resume from: it stopped before its first save, or "
                "its checkpoints were deleted. Train a new run instead (leave out --resume)."
            ) from None
        return
    kind, value = (layout.EPOCH, opts.from_epoch) if opts.from_epoch is not None else (layout.STEP, opts.from_step)
    if value is None:
        return
    keyed_by = saved[-1].keyed_by
    if kind != keyed_by:
        shown = ("..., " if len(keys) > 5 else "") + ", ".join(str(key) for key in keys[-5:])
        raise PipelineError(
            f"run {run_id} keys its checkpoints by {keyed_by} ({keyed_by}s {shown}), so --from-{kind} {value} "
            f"names none of them; pass --from-{keyed_by} N with one of its {keyed_by}s instead."
        )
    if value not in keys:
        # Said before the rewind check: --new-run would not help a pick the run does not have.
        parent = (tags or {}).get(TAG_RESUMED_FROM_RUN)
        earlier = ""
        if parent and value < min(keys):
            # (Its resumed_from tags say where its latest resume started, not where it branched.)
            earlier = (
                f" It is a --new-run child of run {parent}, which holds the {kind}s from before it branched: "
                f"--resume {parent} --from-{kind} {value} --new-run."
            )
        raise PipelineError(
            f"run {run_id} has no checkpoint for {kind} {value}; committed {kind}s: "
            f"{', '.join(str(key) for key in keys)}. Pass --from-{kind} N with one of them.{earlier}"
        )
    latest = max(keys)
    if value < latest and not opts.new_run:
        raise PipelineError(
            f"run {run_id} has checkpoints up to {kind} {latest}; continuing it from {kind} {value} would rewrite "
            f"its later history. Add --new-run to branch a child run from {kind} {value}."
        )


def check_keys(run_id: str, values: Mapping[str, Any], config: tracking.TrackingConfig, *, instead: str) -> None:
    """Refuse to go on in run ``run_id`` with saves keyed otherwise than its checkpoints: a run holds one kind
    of key (epoch or step). Said before the run is touched; ``instead`` says how to save the other way."""
    asked = layout.STEP if values.get("checkpoint_every_steps") is not None else layout.EPOCH
    saved = tracking.list_checkpoints(run_id, config=config)
    if saved and saved[-1].keyed_by != asked:
        flag = "--checkpoint-every-steps" if asked == layout.STEP else "--checkpoint-every"
        raise PipelineError(
            f"run {run_id} keys its checkpoints by {saved[-1].keyed_by}, and {flag} would key the resumed ones by "
            f"{asked}: a run holds one kind of key. Leave {flag} out to save as the run did, or {instead}."
        )


def refuse_changes(run_id: str, changed: Mapping[str, tuple[str, str]], override: bool) -> None:
    """Refuse a resume that changes run ``run_id``'s params (name -> (current, given)) without --override."""
    if changed and not override:
        raise PipelineError(
            f"run {run_id} was trained with other params ({_listed(changed)}); leave these options out to keep the "
            f"run's values, or add --override to apply them (recorded in the tag {TAG_OVERRIDES})."
        )


def current_params(run: Run | None) -> dict[str, str]:
    """The params ``run`` last trained with: its recorded ones, with the values --override gave it since."""
    if run is None:
        return {}
    params = dict(run.data.params)
    for tag, value in run.data.tags.items():
        name = tag.removeprefix(TAG_OVERRIDE_PREFIX)
        if name != tag and name in params:
            params[name] = value
    return params


def override_tags(where: str, changed: Mapping[str, tuple[str, str]], origin: Run, new_run: bool) -> dict[str, str]:
    """The tags that record the params this resume changes (name -> (current, given)) from ``where`` (``"epoch 4"``,
    ``"step 120"``) on: the overrides tag, appended to on RUN_ID itself, and there each param's value from now
    on, which its later resumes take (:func:`current_params`). A ``--new-run`` child records them as its params."""
    if not changed:
        return {}
    note = f"from {where}: {_listed(changed)}"
    earlier = None if new_run else origin.data.tags.get(TAG_OVERRIDES)
    tags = {TAG_OVERRIDES: f"{earlier}; {note}" if earlier else note}
    if not new_run:
        tags.update({TAG_OVERRIDE_PREFIX + name: given for name, (_, given) in changed.items()})
    return tags


def _listed(changed: Mapping[str, tuple[str, str]]) -> str:
    return ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())


def changed_params(task: Task, opts: options.Options, origin: Run) -> dict[str, tuple[str, str]]:
    """Params this resume changes: name -> (current, new); refused without --override."""
    recorded = current_params(origin)
    changed = opts.conflicts(recorded)
    changed.update({k: (recorded[k], str(v)) for k, v in task.params.items() if recorded.get(k, str(v)) != str(v)})
    refuse_changes(origin.info.run_id, changed, opts.override)
    return changed


def restore(
    task: Task,
    opts: options.Options,
    origin: Run,
    values: Mapping[str, Any],
    split: data.Split,
    device: torch.device,
) -> tuple[State, dict[str, Any]]:
    """The state ``origin``'s checkpoint holds, and the RNG states to restore just before the first epoch."""
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
    apply_lr(loaded.optimizer, loaded.scheduler, values["lr"])
    state = State(loaded.model, loaded.optimizer, loaded.scheduler, epoch, loaded.step or 0)
    return state, loaded.extra["rng"]


def apply_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """Train on with learning rate ``lr`` from the resumed checkpoint, where its optimizer trained with another:
    an ``--override``-n one, or the run's since an override after that checkpoint (a child branched from before
    it records the run's current ``lr`` as its param, and must train with it too)."""
    trained = scheduler.base_lrs if scheduler is not None else [group["lr"] for group in optimizer.param_groups]
    if all(value == lr for value in trained):
        return  # the loaded state as it is: a plain resume goes on bit for bit
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scheduler is not None:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)


def checkpointer(values: Mapping[str, Any], resume_command: str) -> tracking.Checkpointer:
    """The run's checkpoint policy from its settings; ``resume_command`` (with ``{run_id}``) trains it further."""
    # --keep-last all keeps every checkpoint (the best ones among them), and so does --keep-best all: to the
    # Checkpointer, keep_best=None alone means no best kept beside the last ones.
    keep_all = values["keep_last"] is None or values["keep_best"] is None
    return tracking.Checkpointer(
        every_n_epochs=values["checkpoint_every"],
        keep_last=None if keep_all else values["keep_last"],
        keep_best=None if keep_all else values["keep_best"],
        monitor=values["monitor"],
        mode=values["monitor_mode"],
        # For the run's description in the UI: how to evaluate this run and train it further.
        commands=["python -m pipelines.evaluate --run-id {run_id} --checkpoint best", resume_command],
    )


def log_epoch(checkpoints: tracking.Checkpointer, epoch: int, metrics: Mapping[str, float], last: bool) -> None:
    """Log an epoch's metrics, unless the epoch gets a checkpoint: a checkpoint logs its metrics to the
    run itself (and to its logged model), and logging them here too would show every point twice."""
    if not (last or checkpoints.should_save(epoch)):
        mlflow.log_metrics(dict(metrics), step=epoch)


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
    epoch = state.epoch
    params = {
        "pipeline": task.name,
        "dataset": task.dataset,
        **{name: str(value) for name, value in task.params.items()},
        **opts.params(values),
        **described(state),
    }
    tags: dict[str, str] = {}
    run_args: dict[str, Any]
    if origin is None:
        run_args = {"experiment_id": _experiment_id(client, config.experiment_name)}
    elif opts.new_run:
        parent = origin.info.run_id
        experiment_id = _experiment_id(client, opts.experiment) if opts.experiment else origin.info.experiment_id
        run_args = {"experiment_id": experiment_id}
        tags = {MLFLOW_PARENT_RUN_ID: parent, TAG_RESUMED_FROM_RUN: parent, TAG_RESUMED_FROM_EPOCH: str(epoch)}
    else:
        run_args = {"run_id": origin.info.run_id}
        # A run's params cannot change: log only those it lacks (options added since it started).
        params = {name: value for name, value in params.items() if name not in origin.data.params}
        recorded = origin.data.tags.get(TAG_RESUMES, "0")
        resumes = (int(recorded) if recorded.isdecimal() else 0) + 1  # a hand-edited tag restarts the count
        tags = {TAG_RESUMED_FROM_EPOCH: str(epoch), TAG_RESUMES: str(resumes)}
        _note_relogged(client, origin.info.run_id, epoch)
    if origin is not None:
        tags.update(override_tags(f"epoch {epoch}", overrides, origin, opts.new_run))
    # A local store (sqlite, a folder) names a new run in this process, from Python's RNG, which the pipeline
    # seeded: every run of a seed got the same name. Drawn from the OS's entropy, and the seeded state kept.
    seeded = random.getstate()
    random.seed()
    try:
        started = mlflow.start_run(**run_args)
    finally:
        random.setstate(seeded)
    with started as run:
        if params:
            mlflow.log_params(params)
        if tags:
            mlflow.set_tags(tags)
        try:
            yield run
        except KeyboardInterrupt:
            # Ctrl-C: MLflow would end the run FAILED, and Python print a traceback; options.run_pipeline prints this.
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            run_id = run.info.run_id
            launch = f"python -m {task.name}"
            if opts.strategy is not None:
                ranks = torch.distributed.get_world_size()
                launch = f"torchrun --nproc-per-node {ranks} -m {task.name} --strategy {opts.strategy}"
            raise KeyboardInterrupt(
                f"interrupted: run {run_id} ended KILLED; `{launch} --resume {run_id} --epochs {opts.epochs}` goes "
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


def announce(client: MlflowClient, run: mlflow.ActiveRun) -> None:
    """Print the run's ID and experiment, and where to view it when the tracking server has a UI."""
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    print(f"MLflow run {run_id} (experiment {experiment_id})", flush=True)
    link = ui_link(client, f"experiments/{experiment_id}/runs/{run_id}")
    if link:
        print(f"view it at {link}", flush=True)


def log_whole_model(model: torch.nn.Module) -> Any:
    """The whole model in MLflow's pytorch flavor (``mlflow.pytorch.load_model``, serving); MLflow's ``ModelInfo``.

    A pickle on purpose: that is what the flavor loads. MLflow warns about it at every save; the
    pipeline silences that and says it once, in :func:`report`, with what it means for loading.
    """
    with muted("mlflow.pytorch", "Saving pytorch model by Pickle"):
        return tracking.log_model(model, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def report(
    client: MlflowClient,
    run: mlflow.ActiveRun,
    whole_model_id: str | None = None,
    config: tracking.TrackingConfig | None = None,
) -> None:
    """Print what the run holds and how to load each: its latest and best checkpoints, the whole model
    (when one was logged), and where the UI shows them."""
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    for which in ("latest", "best"):
        try:
            found = tracking.find_checkpoint(run_id, which, config=config)
        except tracking.NotFoundError:
            continue
        manifest = found.manifest
        at = f"step {manifest.step}" if manifest.keyed_by == layout.STEP else f"epoch {manifest.epoch}"
        print(f"{which} checkpoint: {at}, models:/{found.model_id}", flush=True)
    if whole_model_id is not None:
        print(
            f"whole model: models:/{whole_model_id} (mlflow.pytorch.load_model; a pickle: load only runs you trust)",
            flush=True,
        )
    run_link = ui_link(client, f"experiments/{experiment_id}/runs/{run_id}")
    if run_link:
        print(f"run {run_id}: {run_link}", flush=True)
        print(f"checkpoints and models: {ui_link(client, f'experiments/{experiment_id}/models')}", flush=True)


def ui_link(client: MlflowClient, page: str) -> str | None:
    """The UI address of ``page`` (e.g. ``experiments/1/runs/<id>``) in the classic training view;
    None when the tracking server has no UI (a local file or database)."""
    uri = str(client.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/{page}{layout.UI_VIEW_QUERY}"


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


def _note_relogged(client: MlflowClient, run_id: str, epoch: int) -> None:
    last = max((m.step for m in client.get_metric_history(run_id, "val_loss")), default=0)
    if last > epoch:
        print(
            f"note: run {run_id} logged metrics up to epoch {last} but its checkpoint is from epoch {epoch}; "
            f"epochs {epoch + 1}..{last} are logged again (MLflow keeps both values; the later is current).",
            file=sys.stderr,
        )
