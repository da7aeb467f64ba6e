"""What a ``--resume`` picks, refuses and restores: the checkpoint of run RUN_ID to go on from.

``--resume RUN_ID [--from-epoch N | --from-step N]`` picks RUN_ID's latest checkpoint, or the one of that
epoch (step); a checkpoint's ``models:/`` URI as RUN_ID picks that one. Refused, each before the run is
touched: a run of another pipeline or dataset, or of none (:func:`check_pipeline`), a run with no committed
checkpoint, a pick the run does not hold or of the other kind of key, a pick before the run's latest checkpoint
that would continue in place (it would rewrite the run's later history; ``--new-run`` branches a child instead),
a save in mid-epoch resumed with another ``--seed`` or a ``--batch-size`` its samples taken are no whole number of
batches of (:func:`resumed_position`), and a run whose training still runs on this host (:func:`check_trainer`).
Without ``--epochs``, a resume trains to the target the run recorded (tag ``tracking.epochs``), and one that has
reached it is refused. :mod:`pipelines.runs` starts the run that goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import tracking
from pipelines import data, options, runs
from pipelines.steps import KEY, Position
from pipelines.task import State, Task
from pipelines.trainer import TAG_TRAINER, RunInUseError, Trainer
from tracking import layout
from tracking.manifest import SHARDED_KIND
from tracking.uri import parse_source


def with_target(opts: options.Options, origin: Run | None) -> options.Options:
    """``opts`` with ``origin``'s recorded target as ``epochs`` when --epochs was left out (a run recorded
    before targets were keeps the pipeline's default)."""
    if origin is None or opts.epochs_given or (recorded := origin.data.tags.get(runs.TAG_EPOCHS)) is None:
        return opts
    if not (recorded.isdecimal() and recorded.isascii() and int(recorded) > 0):
        raise runs.PipelineError(
            f"run {origin.info.run_id} records {recorded!r} as its target number of epochs (tag {runs.TAG_EPOCHS}); "
            "pass --epochs N to say how far to train it."
        )
    return replace(opts, epochs=int(recorded))


def check_target(origin: Run, epoch: int, opts: options.Options) -> None:
    """Refuse to resume ``origin`` from ``epoch`` when that is its target already: there is nothing to train."""
    if epoch < opts.epochs:
        return
    if opts.epochs_given:
        target = "--epochs"
    elif runs.TAG_EPOCHS in origin.data.tags:
        target = f"its target (tag {runs.TAG_EPOCHS})"
    else:  # a run from before targets were recorded
        target = "the pipeline's default --epochs"
    raise runs.PipelineError(
        f"run {origin.info.run_id} ({origin.info.status}) already reached epoch {epoch} and {target} is "
        f"{opts.epochs}; pass --epochs greater than {epoch} to train further."
    )


def pinned(opts: options.Options, config: tracking.TrackingConfig) -> options.Options:
    """``opts`` with a ``--resume models:/...`` that names one checkpoint (its logged model, or a registry version
    made from it) as ``--resume RUN_ID --from-epoch N`` (``--from-step N``): its run, from exactly that checkpoint.
    A ``runs:/RUN_ID/<path>`` is refused: a path names no checkpoint (they are logged models), and the run's latest
    would be resumed whatever it said."""
    if opts.resume is None:
        return opts
    source = opts.resume.strip()
    if source.startswith("runs:/"):
        try:
            parsed = parse_source(source)
        except ValueError as exc:  # runs:/ with no run ID
            raise runs.PipelineError(str(exc)) from exc
        if parsed.artifact_path:
            pick = "--from-epoch N (--from-step N)" if "checkpoint_every_steps" in opts.defaults else "--from-epoch N"
            raise runs.PipelineError(
                f"--resume {source}: a path names no checkpoint; --resume takes a run ID, runs:/RUN_ID or a "
                f"checkpoint's models:/MODEL_ID (or models:/NAME@ALIAS): pass --resume {parsed.run_id} {pick} to "
                "pick one (`tracking checkpoints RUN_ID` lists them)."
            )
    if not source.startswith("models:/"):
        return opts
    try:
        located = tracking.find_checkpoint(opts.resume, config=config)
    except ValueError as exc:
        raise runs.PipelineError(str(exc)) from exc
    except tracking.NotFoundError as exc:
        _refuse_a_whole_model(source, exc, config)
        raise
    kind, key = located.manifest.keyed_by, located.manifest.key
    run_id = located.run_id
    if opts.from_epoch is not None or opts.from_step is not None:
        flag = "--from-epoch" if opts.from_epoch is not None else "--from-step"
        raise runs.PipelineError(
            f"{opts.resume} names one checkpoint already ({layout.label(kind, key)} of run {run_id}), and "
            f"{flag} picks among a run's: leave {flag} out, or pass --resume {run_id} with it."
        )
    return replace(
        opts,
        resume=run_id,
        from_epoch=key if kind == layout.EPOCH else None,
        from_step=key if kind == layout.STEP else None,
    )


def _refuse_a_whole_model(source: str, exc: tracking.NotFoundError, config: tracking.TrackingConfig) -> None:
    """Refuse ``--resume models:/...`` of a logged model that is no checkpoint (a whole model, registered or not)
    in the pipeline's terms: the library's advice, to load it with tracking.load_pickled_model(), was no next step
    for a command line. Returns when ``exc`` is about something else (the library's own error says what it lacks)."""
    from tracking.errors import NotACheckpoint
    from tracking.run import open_run

    if not isinstance(exc, NotACheckpoint):
        return
    run_id = exc.run_id
    try:
        open_run(run_id, config)
    except tracking.TrackingError:
        return  # the refusal sends the user to --resume the run: one that cannot be opened leaves the library's error
    raise runs.PipelineError(
        f"--resume {source}: {exc.name!r} of run {run_id} is a whole model, not a checkpoint: it holds no optimizer "
        f"or RNG state to go on from. Pass --resume {run_id} to go on from the run's latest checkpoint, or a "
        f"checkpoint's models:/ URI (`tracking checkpoints {run_id}` lists them)."
    )


def find_origin(client: MlflowClient, task: Task, opts: options.Options, config: tracking.TrackingConfig) -> Run:
    """The run to resume, once checked that this pipeline can resume it as asked."""
    assert opts.resume is not None
    run = runs.find_run(client, opts.resume, config)
    run_id = run.info.run_id
    check_pipeline(run, task.name, task.dataset)
    check_pick(run_id, opts, config, run.data.tags)
    check_trainer(run, opts)
    return run


def check_pipeline(origin: Run, name: str, dataset: str) -> None:
    """Refuse to resume ``origin`` with pipeline ``name`` (training on ``dataset``) unless that pipeline trained it:
    another one's checkpoint holds another model, or the same model in another framework's shape, and a run no
    pipeline trained (no ``pipeline`` param) says nothing of what it holds. Said before anything is touched, by every
    pipeline alike (a run with no param was resumed by some and refused by others, and sent to `python -m None`)."""
    run_id, params = origin.info.run_id, origin.data.params
    trained_by, trained_on = params.get("pipeline"), params.get("dataset", dataset)
    if trained_by is None:
        raise runs.PipelineError(
            f"run {run_id} records no pipeline param: no training pipeline trained it, so {name} cannot tell what its "
            "checkpoints hold; train a new run instead (leave out --resume)."
        )
    if trained_by == name and trained_on == dataset:
        return
    instead = (
        f"resume it with `python -m {trained_by} --resume {run_id}` (with your other flags)"
        if trained_by != name
        else "train a new run instead (leave out --resume)"
    )
    raise runs.PipelineError(
        f"run {run_id} was trained by {trained_by} on {trained_on}, not by {name} on {dataset}; {instead}."
    )


def check_trainer(origin: Run, opts: options.Options) -> None:
    """Refuse to resume ``origin`` in place while its training still runs on this host, and warn when it is still
    marked RUNNING otherwise: a ``kill -9``-ed or power-lost training leaves it so, the very run to resume, but one
    on another host may still go on. A ``--new-run`` child only reads a committed checkpoint: neither."""
    if origin.info.status != "RUNNING" or opts.new_run:
        return
    run_id = origin.info.run_id
    recorded = Trainer.read(origin.data.tags)
    if recorded is not None and recorded.alive():
        pid = recorded.pid
        raise RunInUseError(
            f"run {run_id} is being trained by process {pid} on this host (since {recorded.since}): two trainings "
            f"of one run overwrite each other's checkpoints. Stop it first (kill {pid}) or wait for it to finish, "
            "then resume; or add --new-run to branch a child run from its latest checkpoint now."
        )
    if recorded is None:
        who = f"records no process that trained it (tag {TAG_TRAINER})"
    elif recorded.on_this_host():
        who = f"last trained by {recorded}, which no longer runs"
    else:
        who = f"last trained by {recorded}, which this host cannot check"
    print(
        f"warning: run {run_id} is still marked RUNNING and {who}; if that training still goes on, the two "
        "trainings of one run overwrite each other's checkpoints.",
        file=sys.stderr,
        flush=True,
    )


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
            raise runs.PipelineError(
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
        raise runs.PipelineError(
            f"run {run_id} keys its checkpoints by {keyed_by} ({keyed_by}s {shown}), so --from-{kind} {value} "
            f"names none of them; pass --from-{keyed_by} N with one of its {keyed_by}s instead."
        )
    if value not in keys:
        # Said before the rewind check: --new-run would not help a pick the run does not have.
        tags = tags or {}
        parent = tags.get(runs.TAG_RESUMED_FROM_RUN)
        branched = tags.get(runs.TAG_BRANCHED_FROM_EPOCH if kind == layout.EPOCH else runs.TAG_BRANCHED_FROM_STEP)
        # Up to where it branched, the pick is its parent's; after, one of its own that retention deleted. A
        # child from before the branch tags existed: its first checkpoint is the best guess of where it branched.
        last_of_parent = int(branched) if branched and branched.isdecimal() else min(keys) - 1
        earlier = ""
        if parent and value <= last_of_parent:
            earlier = (
                f" It is a --new-run child of run {parent}, which holds the {kind}s from before it branched: "
                f"--resume {parent} --from-{kind} {value} --new-run."
            )
        raise runs.PipelineError(
            f"run {run_id} has no checkpoint for {kind} {value}; committed {kind}s: "
            f"{', '.join(str(key) for key in keys)}. Pass --from-{kind} N with one of them.{earlier}"
        )
    latest = max(keys)
    if value < latest and not opts.new_run:
        raise runs.PipelineError(
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
        raise runs.PipelineError(
            f"run {run_id} keys its checkpoints by {saved[-1].keyed_by}, and {flag} would key the resumed ones by "
            f"{asked}: a run holds one kind of key. Leave {flag} out to save as the run did, or {instead}."
        )


def restore(
    task: Task,
    opts: options.Options,
    origin: Run,
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    split: data.Split,
    device: torch.device,
) -> tuple[State, dict[str, Any], Position | None]:
    """The state ``origin``'s checkpoint holds, the RNG states to restore just before the first epoch, and where
    that epoch starts when the checkpoint was saved in mid-epoch."""
    run_id = origin.info.run_id
    try:
        loaded = tracking.load(
            run_id,
            picked(opts),
            mode="train",
            map_location=device,
            model=lambda: task.build_model(split.n_features),
            optimizer=lambda parameters: task.build_optimizer(parameters, values["lr"]),
            scheduler=task.build_scheduler,
        )
    except tracking.MismatchError as exc:
        raise runs.PipelineError(
            f"cannot resume: {task.name} builds a different model than the one logged. {exc}"
        ) from exc
    epoch = loaded.epoch or 0
    check_target(origin, epoch, opts)
    if loaded.optimizer is not None and "rng" not in loaded.extra and isinstance(loaded.rank_state, dict):
        raise _saved_by_ranks(task, opts, run_id, loaded)
    if loaded.optimizer is None or "rng" not in loaded.extra:
        raise runs.PipelineError(
            f"run {run_id}: {loaded.path} holds no optimizer or RNG state, so it cannot be resumed exactly; "
            "resume a checkpoint logged by a training pipeline."
        )
    apply_lr(loaded.optimizer, loaded.scheduler, values["lr"])
    state = State(loaded.model, loaded.optimizer, loaded.scheduler, epoch, loaded.step or 0)
    position = resumed_position(
        Position.read(loaded.extra.get(KEY)), values, overrides, run_id, (state.epoch, state.step)
    )
    return state, loaded.extra["rng"], position


def resumed_position(
    position: Position | None,
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    run_id: str,
    at: tuple[int, int],
) -> Position | None:
    """Where the resumed epoch starts, from ``position``, where the save in mid-epoch of run ``run_id`` at ``at``
    (its epochs completed, its global step) left it: the samples it had taken, skipped in batches of the size it
    trains with now (an ``--override``-n ``--batch-size``). The epoch's order does not depend on the batch size, so
    the epoch goes on with the samples it had left. Refused when they are no whole number of such batches, and with
    an ``--override``-n ``--seed``, which draws another order: either would train some samples twice or never. A
    save at an epoch's end (None) starts the next epoch with any size and seed."""
    if position is None:
        return None
    where = mid_epoch(run_id, *at)
    if "seed" in overrides:
        raise another_order(where, values["seed"])
    resized = position.rebatched(values["batch_size"])
    if resized is not None:
        return resized
    raise other_batches(
        where,
        position,
        f"which are no whole number of batches of {values['batch_size']}",
        f"pass one that divides {position.samples}, or resume from a save at an epoch's end, which any batch size "
        "goes on from",
    )


# A save in mid-epoch that a resume could not go on from, as every pipeline says it (the framework ones too).
def mid_epoch(run_id: str, epoch: int, step: int) -> str:
    """How a refusal names the save of run ``run_id`` at global step ``step``, ``epoch`` epochs completed."""
    return f"run {run_id}: its checkpoint at step {step} was saved in mid-epoch {epoch + 1}"


def another_order(where: str, seed: int) -> runs.PipelineError:
    """The refusal of ``--seed`` ``seed`` (``--override``) from the save in mid-epoch ``where`` names."""
    return runs.PipelineError(
        f"{where}, whose order of samples --seed {seed} would not draw again: the epoch could not go on with the "
        "samples it had left. Keep the run's --seed, or resume from a save at an epoch's end, from which a new seed "
        "draws the next epochs."
    )


def other_batches(where: str, taken: Position, why: str, instead: str) -> runs.PipelineError:
    """The refusal of another ``--batch-size`` (``--override``) from the save in mid-epoch ``where`` names, after
    the batches ``taken``: ``why`` it could not go on, and what to do ``instead`` of keeping the checkpoint's."""
    samples = f"{taken.batches} batches of {taken.batch_size} ({taken.samples} samples)"
    return runs.PipelineError(
        f"{where}, after {samples}, {why}: the epoch could not go on with the samples it had left. Keep the "
        f"checkpoint's --batch-size {taken.batch_size}, {instead}."
    )


def picked(opts: options.Options) -> int | str:
    """The checkpoint ``opts`` resumes: ``--from-step``'s or ``--from-epoch``'s (:func:`check_pick` made sure it is
    the run's kind of key, which an int picks), else the latest."""
    if opts.from_step is not None:
        return opts.from_step
    return "latest" if opts.from_epoch is None else opts.from_epoch


def _saved_by_ranks(
    task: Task, opts: options.Options, run_id: str, loaded: tracking.LoadedCheckpoint
) -> runs.PipelineError:
    """The refusal of a checkpoint saved under torchrun (each rank's RNG and sampler state in its ``rank_state``)."""
    world = loaded.rank_state.get("sampler", {}).get("world_size", "several")
    strategy = "fsdp" if loaded.manifest.kind == SHARDED_KIND else "ddp"
    return runs.PipelineError(
        f"run {run_id}: {loaded.path} was saved by {world} ranks under torchrun, each with its own RNG state and "
        f"share of the batches: resume it with as many, `torchrun --nproc-per-node {world} -m {task.name} "
        f"--strategy {strategy} --resume {run_id} --epochs {opts.epochs}` (with your other flags)."
    )


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
