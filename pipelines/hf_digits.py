"""Train `DigitsClassifier` (a tiny Hugging Face model from a config made in code) on scikit-learn's 8x8
digits with the Hugging Face Trainer; each checkpoint folder it saves becomes a logged model of the run.

python -m pipelines.hf_digits --epochs 6
python -m pipelines.hf_digits --resume RUN_ID --epochs 12
python -m pipelines.hf_digits --epochs 6 --checkpoint-every-steps 20     # checkpoint-step-00000020, ...
python -m pipelines.hf_digits --resume RUN_ID --from-step 40 --new-run --epochs 12
torchrun --nproc-per-node 2 -m pipelines.hf_digits --epochs 6
torchrun --nproc-per-node 2 -m pipelines.hf_digits --resume RUN_ID --epochs 12

The learning rate is constant, so a resumed run goes on exactly as one that never stopped
(`Trainer.train(resume_from_checkpoint=...)` restores the weights, AdamW's state, the RNGs and the
data order). --keep-last is the Trainer's save_total_limit, --monitor its metric_for_best_model
(val_loss: eval_loss, val_accuracy: eval_accuracy); the run's logged models follow its rotation, and a
resume holds the run's earlier checkpoints, whose folders its Trainer never had, to the same rule.

By default the Trainer saves, evaluates and logs at each epoch's end (--checkpoint-every N: every N
epochs, and the last), and the run's checkpoints are keyed by epoch. --checkpoint-every-steps N
(recorded, instead of --checkpoint-every) does all three every N optimizer steps and at the last step
(save_strategy="steps"), and keys them by global step; a save may then fall mid-epoch, and the Trainer
resumes it at its next batch. An evaluation there leaves the RNG states as it found them, so a run
resumed from its last step (where the Trainer evaluates even off the N-step grid) goes on bit for bit
as a longer run. --from-step N picks step N's checkpoint of such a run (--from-epoch is refused
there, and --from-step in a run keyed by epoch); a resume in the same run keeps its kind of key. A resume
without --epochs goes on to the run's target (tag tracking.epochs), and a --new-run child records where it
branched once (tracking.branched_from_epoch, and from a run keyed by step tracking.branched_from_step).

--override applies the options given from the resumed checkpoint on (the learning rate too, which the Trainer
restores with the optimizer, --checkpoint-every-steps, which it restores from trainer_state.json, and --seed,
whose draws it would restore from the checkpoint's RNG states) and
records them in the run's override tags, which its later resumes go on with.

Under torchrun the Trainer trains DDP on the CPU (gloo), every flag as in one process but --strategy fsdp:
rank 0 alone finds the run to resume, starts the run, logs and prints; every rank gets the run's ID, has
the callback (each checkpoint holds every rank's RNG state) and resumes from the run's checkpoint. A run
resumes on as many ranks as saved its checkpoint (on another number the Trainer would split an epoch into other
batches per rank and go on at another place): another number is refused before anything is touched.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines import hf_callbacks, hf_resume, options

NAME = "pipelines.hf_digits"
DATASET = "digits"
HIDDEN, DROPOUT = 32, 0.1
PARAMS = {
    "model": "DigitsClassifier",
    "hidden": HIDDEN,
    "dropout": DROPOUT,
    "optimizer": "AdamW",
    "schedule": "constant",
}
DEFAULTS = {"epochs": 6, "lr": 5e-3, "batch_size": 64}
# The shared --monitor names, as the Trainer's metric_for_best_model names them (it logs them with "eval_").
MONITORS = {"val_loss": "loss", "val_accuracy": "accuracy"}

# torch, transformers and MLflow are imported once the command line is parsed: --help answers at once.


def main(argv: Sequence[str] | None = None) -> int:
    opts = options.parse(argv, prog=f"python -m {NAME}", description=__doc__, defaults=DEFAULTS, steps=True)
    return options.run_pipeline(lambda: train(opts))


def train(opts: options.Options) -> str:
    """Train a new run, or resume one, as ``opts`` says, in this process or with every rank of a torchrun
    job; returns the run ID (on every rank)."""
    from pipelines import parallel, runs

    if opts.strategy == "fsdp":
        raise runs.PipelineError(
            f"--strategy fsdp: {NAME} trains with the Trainer's DDP under torchrun; leave --strategy out "
            f"(`torchrun --nproc-per-node N -m {NAME} ...`)."
        )
    if not parallel.launched():
        if opts.strategy is not None:
            raise runs.PipelineError(
                f"--strategy {opts.strategy} trains with several processes: launch it with "
                f"`torchrun --nproc-per-node N -m {NAME} ...`."
            )
        return _train(opts)
    # The group the Trainer would start when TrainingArguments is made: made first, so that rank 0 can
    # settle the run (whose params the arguments take) and hand its ID to every rank.
    with parallel.process_group():
        return _train(opts)


def _train(opts: options.Options) -> str:
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import Trainer, TrainingArguments

    import tracking
    from pipelines import data, noise, override, parallel, reporting, resume, runs
    from pipelines.hf_model import DigitsClassifier, DigitsConfig, Examples, accuracy
    from tracking import layout
    from tracking.integrations.transformers import TrackingCallback, checkpoint_folder
    from tracking.parallel import distributed
    from tracking.pruning import prune

    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    opts = distributed.on_rank0(lambda: resume.pinned(opts, config))
    # An int picks a step in a run keyed by step, else an epoch (_origin checked which the run has).
    which = opts.from_step or opts.from_epoch or "latest"
    split = data.load(DATASET)
    world = distributed.world_size()

    def settle() -> tuple[options.Options, Any, dict[str, Any], dict[str, str], bool]:
        origin = _origin(client, opts, config) if opts.resume else None
        settled = resume.with_target(opts, origin)
        current = override.current_params(origin)
        values = opts.settings(current, origin.info.run_id if origin else None)
        changed: dict[str, tuple[str, str]] = {}
        if origin is not None:
            changed = opts.conflicts(current)
            runs.refuse_changes(origin.info.run_id, changed, opts.override)
            if not opts.new_run:
                resume.check_keys(origin.info.run_id, values, config, instead="add --new-run to branch a child run")
        _metric_for_best_model(values)
        if origin is None:
            return settled, origin, values, runs.resume_tags(None, settled, {}, 0), False
        located = tracking.find_checkpoint(origin.info.run_id, which, config=config)
        picked = located.manifest
        epoch = picked.epoch or 0  # the epochs completed
        resume.check_target(origin, epoch, settled)
        hf_resume.check_ranks(located, world, NAME)
        hf_resume.check_samples_left(located, values, changed, len(split.x_train), world)
        # Where the resume started: the epochs completed, and the step of a save by steps.
        step = picked.step if picked.keyed_by == layout.STEP else None
        return settled, origin, values, runs.resume_tags(origin, settled, changed, epoch, step), "seed" in changed

    # Rank 0 alone reads MLflow; every rank gets what it found, or its error.
    opts, origin, values, tags, reseeded = distributed.on_rank0(settle)
    launcher = f"torchrun --nproc-per-node {world}" if parallel.launched() else "python"
    # --keep-best all keeps every checkpoint, as --keep-last all does (the Trainer keeps the best beside the last).
    keep_last = values["keep_last"] if values["keep_best"] is not None else None
    # The frameworks' adverts and warnings about their own code would bury the run's lines.
    with (
        parallel.lead_run(lambda: _start(client, config, opts, origin, values, tags, f"{launcher} -m {NAME}")) as (
            run,
            run_id,
        ),
        noise.transformers_quiet(),
    ):
        # Scratch space for the Trainer's folders, shared by a machine's ranks: every checkpoint that
        # matters is in the run.
        output_dir = Path(tempfile.gettempdir()) / "tracking-hf-digits" / run_id
        if distributed.local_rank() == 0:
            shutil.rmtree(output_dir, ignore_errors=True)
        distributed.barrier()
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(values["seed"])
        model = DigitsClassifier(DigitsConfig(n_features=split.n_features, hidden=HIDDEN, dropout=DROPOUT))
        # Saved, evaluated and logged at the same points, so that each checkpoint carries the metrics it is
        # ranked by: every N optimizer steps (and the last, keyed by global step), or at each epoch's end.
        steps = values["checkpoint_every_steps"]
        interval: dict[str, Any] = {"save_strategy": "epoch", "eval_strategy": "epoch", "logging_strategy": "epoch"}
        if steps is not None:
            interval = {"save_strategy": "steps", "eval_strategy": "steps", "logging_strategy": "steps"}
            interval.update(save_steps=steps, eval_steps=steps, logging_steps=steps)
        # Under torchrun the Trainer runs DDP on the CPU over gloo, as the other pipelines' --strategy ddp. Every
        # parameter takes part in each step: DDP need not look for unused ones (and warn that it found none).
        ranks: dict[str, Any] = {}
        if parallel.launched():
            ranks = {"use_cpu": True, "ddp_backend": "gloo", "ddp_find_unused_parameters": False}
        args = TrainingArguments(
            str(output_dir),
            num_train_epochs=opts.epochs,
            per_device_train_batch_size=values["batch_size"],
            learning_rate=values["lr"],
            lr_scheduler_type="constant",
            save_total_limit=keep_last,
            metric_for_best_model=MONITORS[values["monitor"]],
            greater_is_better=values["monitor_mode"] == "max",
            seed=values["seed"],
            report_to="none",  # the run is this pipeline's; the callback and EpochMetrics log to it
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            **interval,
            **ranks,
        )
        checkpoints = TrackingCallback(
            run_id=run_id,
            every_n_epochs=values["checkpoint_every"] or 1,  # saves by steps: save_steps thins them
            commands=[f"{launcher} -m {NAME} --resume {{run_id}} --epochs {2 * opts.epochs}"],
            config=config,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Examples(split.x_train, split.y_train),
            eval_dataset=Examples(split.x_val, split.y_val),
            compute_metrics=accuracy,
            callbacks=[
                hf_callbacks.epoch_metrics(),
                checkpoints,
                *([hf_callbacks.given_intervals(), hf_callbacks.neutral_evaluations()] if steps is not None else []),
                # The Trainer restores the checkpoint's learning rate with the optimizer and the scheduler.
                *([hf_callbacks.learning_rate(values["lr"])] if origin is not None else []),
            ],
        )
        folder = None
        if origin is not None:
            # On every rank (rank 0 downloads, a machine's ranks share its folder), once the Trainer is made.
            folder = checkpoint_folder(origin.info.run_id, which, output_dir=output_dir, config=config)
            if reseeded:
                _drop_rng_states(folder)
        trainer.train(resume_from_checkpoint=folder)
        if run is not None:
            if origin is not None and keep_last is not None:
                # The Trainer rotated only the folders of this invocation (and the one it resumed from): the
                # run's earlier checkpoints are held to --keep-last (and the best) as its rotation holds these.
                prune(
                    run_id,
                    keep_last=keep_last,
                    keep_best=1,
                    monitor=f"eval_{MONITORS[values['monitor']]}",
                    mode=values["monitor_mode"],
                    config=config,
                )
            reporting.report(client, run, config=config)
        distributed.barrier()  # no rank deletes the folder another still reads
        if distributed.local_rank() == 0:
            shutil.rmtree(output_dir, ignore_errors=True)
        return run_id


@contextmanager
def _start(
    client: Any,
    config: Any,
    opts: options.Options,
    origin: Any,
    values: Mapping[str, Any],
    tags: Mapping[str, str],
    launch: str,
) -> Iterator[Any]:
    """The MLflow run this training writes to (new, RUN_ID itself, or its child), params and ``tags``
    (:func:`pipelines.runs.resume_tags`) logged; Ctrl-C ends it KILLED, saying how to go on with ``launch``
    (``python -m PIPELINE``)."""
    import mlflow

    from pipelines import reporting, runs
    from pipelines.hf_model import DigitsClassifier

    recorded = origin.data.params if origin else {}
    if origin is None:
        run_args: dict[str, Any] = {"experiment_id": mlflow.set_experiment(config.experiment_name).experiment_id}
    elif opts.new_run:
        experiment = mlflow.set_experiment(opts.experiment).experiment_id if opts.experiment else None
        run_args = {"experiment_id": experiment or origin.info.experiment_id}
    else:
        run_args = {"run_id": origin.info.run_id}
    params = {
        "pipeline": NAME,
        "dataset": DATASET,
        "model_class": f"{DigitsClassifier.__module__}:{DigitsClassifier.__qualname__}",
        **{name: str(value) for name, value in PARAMS.items()},
        **opts.params(values),
    }
    with runs.start_run(**run_args) as run, runs.killed_on_ctrl_c(run, launch, opts.epochs):
        mlflow.log_params({k: v for k, v in params.items() if k not in recorded or opts.new_run})
        reporting.announce(client, run)
        mlflow.set_tags(dict(tags))
        runs.check_store(run.info.run_id, config)
        yield run


def _origin(client: Any, opts: options.Options, config: Any) -> Any:
    """The run to resume, once checked that this pipeline trained it and can go on as asked."""
    from pipelines import resume, runs

    assert opts.resume is not None
    origin = runs.find_run(client, opts.resume, config)
    run_id = origin.info.run_id
    resume.check_pipeline(origin, NAME, DATASET)
    resume.check_pick(run_id, opts, config, origin.data.tags)
    resume.check_trainer(origin, opts)
    return origin


def _drop_rng_states(folder: str) -> None:
    """Leave out the RNG states of the checkpoint ``folder`` an ``--override --seed N`` resumes from: the Trainer
    restores them (``rng_state*.pth``) over the seed it set when it was made, which the data order alone took from
    N. Without them it draws from N from there on, as the own-loop pipelines do."""
    from tracking.parallel import distributed

    distributed.barrier()  # every rank has its folder: a machine's ranks share the one its first rank wrote
    if distributed.local_rank() == 0:
        for state in Path(folder).glob("rng_state*.pth"):
            state.unlink()
    distributed.barrier()


def _metric_for_best_model(values: Mapping[str, Any]) -> str:
    from pipelines import runs

    if values["monitor"] not in MONITORS:
        raise runs.PipelineError(
            f"--monitor {values['monitor']}: the Trainer ranks checkpoints by its evaluation metrics; pass "
            f"--monitor {' or '.join(MONITORS)}."
        )
    if values["keep_best"] not in (None, 1):
        raise runs.PipelineError(
            f"--keep-best {values['keep_best']}: the Trainer keeps one best checkpoint (metric_for_best_model); "
            "pass --keep-best 1."
        )
    return MONITORS[values["monitor"]]


if __name__ == "__main__":
    sys.exit(main())
