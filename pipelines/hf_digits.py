"""Train `DigitsClassifier` (a tiny Hugging Face model from a config made in code) on scikit-learn's 8x8
digits with the Hugging Face Trainer; each epoch's checkpoint folder becomes a logged model of the run.

python -m pipelines.hf_digits --epochs 6
python -m pipelines.hf_digits --resume RUN_ID --epochs 12

The learning rate is constant, so a resumed run goes on exactly as one that never stopped
(`Trainer.train(resume_from_checkpoint=...)` restores the weights, AdamW's state, the RNGs and the
data order). --keep-last is the Trainer's save_total_limit, --monitor its metric_for_best_model
(val_loss: eval_loss, val_accuracy: eval_accuracy); the run's logged models follow its rotation.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import options

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
    opts = options.parse(argv, prog=f"python -m {NAME}", description=__doc__, defaults=DEFAULTS)
    return options.run_pipeline(lambda: train(opts))


def train(opts: options.Options) -> str:
    """Train a new run, or resume one, as ``opts`` says; returns the run ID."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    from transformers import Trainer, TrainingArguments

    import tracking
    from pipelines import data, noise, runs
    from pipelines.hf_model import DigitsClassifier, DigitsConfig, Examples, accuracy
    from pipelines.parallel import launched
    from tracking.integrations.transformers import TrackingCallback, checkpoint_folder

    if opts.strategy is not None or launched():
        # Each process would start a run of its own: the pipeline's run, metrics and output are one process's.
        raise runs.PipelineError(
            f"{NAME} trains in one process; run it with `python -m {NAME}`, without torchrun or --strategy "
            "(TrackingCallback itself works under torchrun: README, Hugging Face Trainer)."
        )
    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    origin = _origin(client, opts, config) if opts.resume else None
    recorded = origin.data.params if origin else {}
    values = opts.settings(recorded)
    _check_overrides(opts, recorded)
    monitor = _metric_for_best_model(values)
    split = data.load(DATASET)
    if origin is None:
        run_args: dict[str, Any] = {"experiment_id": mlflow.set_experiment(config.experiment_name).experiment_id}
        tags: dict[str, str] = {}
    elif opts.new_run:
        parent = origin.info.run_id
        experiment = mlflow.set_experiment(opts.experiment).experiment_id if opts.experiment else None
        run_args = {"experiment_id": experiment or origin.info.experiment_id}
        tags = {MLFLOW_PARENT_RUN_ID: parent, runs.TAG_RESUMED_FROM_RUN: parent}
    else:
        run_args, tags = {"run_id": origin.info.run_id}, {}
    params = {
        "pipeline": NAME,
        "dataset": DATASET,
        "model_class": f"{DigitsClassifier.__module__}:{DigitsClassifier.__qualname__}",
        **{name: str(value) for name, value in PARAMS.items()},
        **{name: options.param_value(values[name]) for name in options.RECORDED},
    }
    # The frameworks' adverts and warnings about their own code would bury the run's lines.
    with mlflow.start_run(**run_args) as run, noise.transformers_quiet():
        run_id = run.info.run_id
        mlflow.log_params({k: v for k, v in params.items() if k not in recorded or opts.new_run})
        runs.announce(client, run)
        # Scratch space for the Trainer's folders: every checkpoint that matters is in the run.
        output_dir = Path(tempfile.gettempdir()) / "tracking-hf-digits" / run_id
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        folder = None
        if origin is not None:
            which = "latest" if opts.from_epoch is None else opts.from_epoch
            folder = checkpoint_folder(origin.info.run_id, which, output_dir=output_dir, config=config)
            epoch = tracking.find_checkpoint(origin.info.run_id, which, config=config).manifest.epoch or 0
            if epoch >= opts.epochs:
                raise runs.PipelineError(
                    f"run {origin.info.run_id} already reached epoch {epoch} and --epochs is {opts.epochs}; pass "
                    f"--epochs greater than {epoch} to train further."
                )
            mlflow.set_tags({**tags, runs.TAG_RESUMED_FROM_EPOCH: str(epoch)})
        torch.manual_seed(values["seed"])
        model = DigitsClassifier(DigitsConfig(n_features=split.n_features, hidden=HIDDEN, dropout=DROPOUT))
        args = TrainingArguments(
            str(output_dir),
            num_train_epochs=opts.epochs,
            per_device_train_batch_size=values["batch_size"],
            learning_rate=values["lr"],
            lr_scheduler_type="constant",
            save_strategy="epoch",
            eval_strategy="epoch",
            logging_strategy="epoch",
            save_total_limit=values["keep_last"],
            metric_for_best_model=monitor,
            greater_is_better=values["monitor_mode"] == "max",
            seed=values["seed"],
            report_to="none",  # the run is this pipeline's; the callback and EpochMetrics log to it
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        checkpoints = TrackingCallback(
            every_n_epochs=values["checkpoint_every"],
            commands=[f"python -m {NAME} --resume {{run_id}} --epochs {2 * opts.epochs}"],
            config=config,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Examples(split.x_train, split.y_train),
            eval_dataset=Examples(split.x_val, split.y_val),
            compute_metrics=accuracy,
            callbacks=[_epoch_metrics(), checkpoints],
        )
        trainer.train(resume_from_checkpoint=folder)
        runs.report(client, run, config=config)
        shutil.rmtree(output_dir, ignore_errors=True)
        return str(run_id)


def _origin(client: Any, opts: options.Options, config: Any) -> Any:
    """The run to resume, once checked that this pipeline trained it and can go on as asked."""
    import tracking
    from pipelines import runs

    assert opts.resume is not None
    origin = runs.find_run(client, opts.resume, config)
    run_id, params = origin.info.run_id, origin.data.params
    if params.get("pipeline", NAME) != NAME:
        raise runs.PipelineError(
            f"run {run_id} was trained by {params['pipeline']}, not by {NAME}; resume it with "
            f"`python -m {params['pipeline']}`."
        )
    if opts.from_epoch is not None and not opts.new_run:
        latest = max((m.epoch or 0 for m in tracking.list_checkpoints(run_id, config=config)), default=0)
        if opts.from_epoch < latest:
            raise runs.PipelineError(
                f"run {run_id} has checkpoints up to epoch {latest}; continuing it from epoch {opts.from_epoch} "
                f"would rewrite its later history. Add --new-run to branch a child run from epoch {opts.from_epoch}."
            )
    return origin


def _check_overrides(opts: options.Options, recorded: Mapping[str, str]) -> None:
    from pipelines import runs

    changed = opts.conflicts(recorded)
    if changed and not opts.override:
        listed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        raise runs.PipelineError(
            f"the run was trained with other params ({listed}); leave these options out to keep the run's "
            "values, or add --override to apply them."
        )


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


def _epoch_metrics() -> Any:
    """A callback logging the metrics of the epochs that get no checkpoint (a checkpoint logs its own)."""
    import mlflow
    from transformers import TrainerCallback

    from tracking.integrations.transformers import checkpoint_metrics

    class EpochMetrics(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any) -> None:
            # Logged before the epoch's save: should_save says whether a checkpoint will carry these.
            # At the global step, where TrackingCallback charts a checkpoint's: one chart, one x axis.
            metrics = checkpoint_metrics([logs or {}], state.global_step)
            if metrics and not control.should_save:
                mlflow.log_metrics(metrics, step=state.global_step)

    return EpochMetrics()


if __name__ == "__main__":
    sys.exit(main())
