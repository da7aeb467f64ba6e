"""Evaluate a trained model on its run's validation data, and log the result to the run.

    python -m pipelines.evaluate --run-id RUN_ID [--checkpoint latest|best|N]
    python -m pipelines.evaluate --run-id models:/<model_id>          (one checkpoint)
    python -m pipelines.evaluate --run-id models:/<name>@<alias>      (a registered checkpoint)
    python -m pipelines.evaluate --run-id RUN_ID --checkpoint state_dict
    python -m pipelines.evaluate --run-id RUN_ID --checkpoint model --trust-pickle

A checkpoint or the state dict is rebuilt by `tracking.load` / `tracking.load_model` without
unpickling; ``model`` is the whole model in MLflow's pytorch flavor, a pickle, hence
``--trust-pickle``. The run's `dataset` param says which data. It evaluates runs of pipelines.train and
pipelines.digits; the Lightning and Hugging Face pipelines evaluate each checkpoint as they save it.
Metrics are logged as `eval_loss` and `eval_accuracy` at the epoch the model holds (a checkpoint's own; the state dict's
and the whole model's, the last epoch of the training that logged them) through the client, so a finished run stays
finished. In a run saved by steps (`--checkpoint-every-steps`), which charts by global step, they go at the model's
global step instead: a checkpoint's own; the state dict's and the whole model's, the step the training that logged them
ended at, which the state dict records (one logged before it did is charted at its epoch, and the output says so).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines import digits, options, train
from tracking.errors import run_command
from tracking.uri import parse_source

# MLflow, torch and scikit-learn are imported when evaluation runs, after the command line is
# parsed: `--help` and usage errors answer at once.
if TYPE_CHECKING:
    from mlflow.entities import Run
    from torch import nn

TASKS = {task.dataset: task for task in (train.TASK, digits.TASK)}
# What --checkpoint takes besides latest, best and an epoch number.
WHOLE_MODEL = "model"
STATE_DICT = "state_dict"


def evaluate(source: str, checkpoint: str | int | None = None, *, trust_pickle: bool = False) -> dict[str, float]:
    """Validation loss and accuracy of a model the run logged, also logged to the run as ``eval_*`` metrics.

    ``checkpoint`` picks among a run's models (default: its latest checkpoint); a ``models:/`` source names one
    already, and takes none but ``"model"`` (a whole model's URI, which unpickles)."""
    from mlflow.tracking import MlflowClient

    import tracking
    from pipelines import data, runs
    from pipelines.task import measure
    from tracking import layout
    from tracking.source import open_run_pinned

    config = tracking.TrackingConfig.from_env()
    client = MlflowClient(config.tracking_uri)
    run = runs.find_run(client, source, config)
    if parse_source(source).artifact_path:
        # The run's models are picked by --checkpoint, not by a path: runs:/RUN_ID/model ended in a traceback.
        raise runs.PipelineError(
            f"--run-id {source.strip()}: a path names none of the run's models here; pass --run-id "
            f"{run.info.run_id} with --checkpoint latest, best, N, {STATE_DICT} or {WHOLE_MODEL} --trust-pickle "
            f"(`tracking checkpoints {run.info.run_id}` lists its checkpoints)."
        )
    if checkpoint not in (None, WHOLE_MODEL) and parse_source(source).run_id is None:
        # Else a checkpoint's URI with --checkpoint state_dict was evaluated as that checkpoint, named state_dict.
        raise runs.PipelineError(
            f"{source} names one model already, and --checkpoint {checkpoint} picks among a run's: leave "
            f"--checkpoint out to evaluate it, or pass --run-id {run.info.run_id} --checkpoint {checkpoint}."
        )
    # The logged model a models:/ URI names, a registry version's too: a whole model is registered as a checkpoint is.
    model_id = open_run_pinned(source, config)[1] if parse_source(source).run_id is None else None
    model_type = client.get_logged_model(model_id).model_type if model_id else None
    is_checkpoint = model_type == layout.CHECKPOINT_MODEL_TYPE
    if checkpoint is None and model_id and not is_checkpoint:
        raise runs.PipelineError(
            f"{source} is not a checkpoint but a whole model, a pickle: add --checkpoint {WHOLE_MODEL} --trust-pickle "
            "to evaluate it if you trust the run, or pass a checkpoint's models:/ URI or the run ID."
        )
    if checkpoint == WHOLE_MODEL and is_checkpoint:
        # Else unpickled as a whole model, which it is not: "has no whole model: ... did not get there", of a run
        # that logged one.
        raise runs.PipelineError(
            f"{source} is a checkpoint, not a whole model: leave --checkpoint out to evaluate it, or pass --run-id "
            f"{run.info.run_id} --checkpoint {WHOLE_MODEL} --trust-pickle for the run's whole model."
        )
    pipeline = run.data.params.get("pipeline")
    if pipeline is not None and pipeline not in {task.name for task in TASKS.values()}:
        # Its dataset may be one evaluate knows (digits): the loader then refused its model's class, saying to
        # import a module, which no option of this command does.
        raise runs.PipelineError(
            f"run {run.info.run_id} was trained by {pipeline}, which evaluates each checkpoint as it saves it: "
            f"`tracking checkpoints {run.info.run_id}` lists them with their metrics. pipelines.evaluate "
            "evaluates runs of pipelines.train and pipelines.digits."
        )
    dataset = run.data.params.get("dataset")
    if dataset not in TASKS:
        raise runs.PipelineError(
            f"run {run.info.run_id} has dataset param {dataset!r}; evaluate knows {sorted(TASKS)}, "
            "i.e. runs of pipelines.train and pipelines.digits."
        )
    task = TASKS[dataset]
    model, what, at = _load(source, run, task.name, checkpoint, trust_pickle)
    by_step = _charts_by_step(run)
    if at.step is None and at.epoch is None:  # logged before the pipelines recorded it: at the end of training
        last = runs.last_logged_epoch(client, run.info.run_id)  # the last step, in a run charted by step
        at = Charted(None, last) if by_step else Charted(last)
    if by_step and at.step is None:
        print(
            f"note: run {run.info.run_id} charts by global step, and its {what} records no step (it was logged before "
            f"the pipelines recorded one): its eval_* metrics are charted at step {at.chart_step}, its epoch.",
            file=sys.stderr,
        )
    split = data.load(task.dataset)
    loss, accuracy = measure(task, model, split.x_val, split.y_val)
    metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value, step=at.chart_step)
    print(f"run {run.info.run_id} {what} ({at}): " + " ".join(f"{name}={value:.6f}" for name, value in metrics.items()))
    return metrics


@dataclass(frozen=True)
class Charted:
    """Where a model's ``eval_*`` metrics go on its run's charts: at its ``epoch``, or at its global ``step`` in a run
    charted by step (a checkpoint of ``--checkpoint-every-steps``, keyed by step); both None: not recorded."""

    epoch: int | None
    step: int | None = None

    @property
    def chart_step(self) -> int:
        return self.step if self.step is not None else self.epoch or 0

    def __str__(self) -> str:
        if self.step is None:
            return f"epoch {self.epoch}"
        return f"step {self.step}" + ("" if self.epoch is None else f", {self.epoch} epochs completed")


# Why a run lacks the state dict or the whole model, and what to evaluate instead.
_ENDED = (
    "a training pipeline logs it when the run's last epoch ends, and this one did not get there (or is not such a "
    "run); leave --checkpoint out to evaluate its latest checkpoint."
)


def _load(
    source: str, run: Run, pipeline: str, checkpoint: str | int | None, trust_pickle: bool
) -> tuple[nn.Module, str, Charted]:
    """The model to evaluate, how to name it, and where its metrics are charted; ``pipeline`` trained the run. A
    checkpoint holds its own epoch, and its global step, where a run keyed by step charts it; the state dict and the
    whole model, the epoch the training that logged them ended with, which they record
    (:func:`pipelines.runs.log_final_weights`)."""
    # The loader rebuilds only classes whose module is imported already: the pipelines' models.
    from mlflow.exceptions import MlflowException

    import pipelines.models  # noqa: F401
    import tracking
    from pipelines import runs
    from tracking import layout
    from tracking.selection import find_weights

    run_id = run.info.run_id
    if checkpoint == WHOLE_MODEL:
        if not trust_pickle:
            raise runs.PipelineError(
                f"{source}: the whole model is a pickle and unpickling runs code from the artifact; pass "
                "--trust-pickle if you trust this run, or evaluate a checkpoint or the state_dict."
            )
        try:
            model = tracking.load_pickled_model(source, trust_pickle=True)
        except tracking.NotFoundError as exc:
            if not isinstance(exc.__cause__, MlflowException):
                raise  # it is there, but its class cannot be imported here: the loader's message says which
            raise runs.PipelineError(f"{source} has no whole model: {_ENDED}") from exc
        epoch = _whole_model_epoch(source, run)
        return model, "whole model", Charted(epoch, _final_step(run, epoch) if _charts_by_step(run) else None)
    if checkpoint == STATE_DICT:
        # Its folder by name: the run alone would be read as its latest checkpoint where it has no state dict.
        uri = f"runs:/{run_id}/{STATE_DICT}"
        try:
            manifest = find_weights(uri).manifest
            step = manifest.step if _charts_by_step(run) else None
            return tracking.load_model(uri), "state_dict", Charted(manifest.epoch, step)
        except tracking.NotFoundError as exc:
            raise runs.PipelineError(f"run {run_id} has no state dict: {_ENDED}") from exc
    # The weights alone: rebuilding the optimizer too (tracking.load) would cost a second of
    # torch's start-up (its first optimizer imports torch._dynamo) for nothing evaluation uses.
    try:
        located = tracking.find_checkpoint(source, "latest" if checkpoint is None else checkpoint)
    except tracking.NotFoundError as exc:
        if tracking.list_checkpoints(run_id):
            raise  # not the one asked for: the library's message lists those the run has
        raise runs.PipelineError(_without_checkpoints(run_id, pipeline)) from exc
    model = tracking.load_model(f"models:/{located.model_id}", mode="eval")
    manifest = located.manifest
    # A checkpoint keyed by step had its metrics charted at its global step: its eval_* go beside them.
    return model, located.label, Charted(manifest.epoch, manifest.step if manifest.keyed_by == layout.STEP else None)


def _whole_model_epoch(source: str, run: Run) -> int | None:
    """The epoch of the whole model ``source`` names (a run: its newest, which ``runs:/RUN_ID/model`` loads): the
    step it was logged at among the run's outputs; None when it was logged at none (step 0) or is a registry's."""
    from mlflow.tracking import MlflowClient

    from tracking import layout

    model_id = parse_source(source).model_id
    if model_id is None and parse_source(source).run_id is not None:
        newest = MlflowClient().search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"name = '{layout.MODEL_NAME}' AND source_run_id = '{run.info.run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            max_results=1,
        )
        model_id = newest[0].model_id if newest else None
    outputs = run.outputs.model_outputs if run.outputs else []
    return max((output.step for output in outputs if output.model_id == model_id), default=0) or None


def _charts_by_step(run: Run) -> bool:
    """Whether ``run`` charts by global step: it saves by steps (its recorded ``checkpoint_every_steps``)."""
    return run.data.params.get("checkpoint_every_steps", options.NONE) != options.NONE


def _final_step(run: Run, epoch: int | None) -> int | None:
    """The global step the whole model of ``epoch`` is from: the one the state dict logged beside it (the same
    weights, :func:`pipelines.runs.log_final_weights`) records, when that is of the same epoch; else None."""
    import tracking
    from tracking.selection import find_weights

    if epoch is None:
        return None
    try:
        manifest = find_weights(f"runs:/{run.info.run_id}/{STATE_DICT}").manifest
    except tracking.NotFoundError:
        return None
    return manifest.step if manifest.epoch == epoch else None


def _without_checkpoints(run_id: str, pipeline: str) -> str:
    """What a run without checkpoints lacks, and what to evaluate or train instead."""
    import tracking
    from tracking.selection import find_weights

    try:
        find_weights(f"runs:/{run_id}/{STATE_DICT}")
        instead = (
            f"evaluate the weights its training ended with (--checkpoint {STATE_DICT}, or --checkpoint {WHOLE_MODEL} "
            f"--trust-pickle), or train a new run with `python -m {pipeline}`."
        )
    except tracking.NotFoundError:
        instead = f"train a new run with `python -m {pipeline}` and evaluate that."
    return (
        f"run {run_id} has no committed checkpoint to evaluate (it stopped before its first save, or its checkpoints "
        f"were deleted), so it cannot be resumed either; {instead}"
    )


def _checkpoint(text: str) -> str | int:
    if text in ("latest", "best", WHOLE_MODEL, STATE_DICT):
        return text
    if text.isdecimal() and text.isascii():  # not "²" or "١", which isdigit() takes
        return int(text)
    raise argparse.ArgumentTypeError(f"expected latest, best, an epoch number, state_dict or model; got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-id", required=True, help="run ID, runs:/<id>, models:/<model_id> or models:/<name>@<alias>"
    )
    parser.add_argument(
        "--checkpoint",
        type=_checkpoint,
        help="which of the run's models: latest, best, an epoch number (a global step in a run saved by "
        "--checkpoint-every-steps), state_dict or model (default: latest; a models:/ URI names one already)",
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow --checkpoint model to unpickle")
    args = parser.parse_args(argv)

    def run() -> dict[str, float]:
        from tracking.cli.server import connect

        connect()  # no MLFLOW_TRACKING_URI: the local stack if it runs
        return evaluate(args.run_id, args.checkpoint, trust_pickle=args.trust_pickle)

    from mlflow.exceptions import MlflowException

    # MLflow's own errors (a refused request, an unknown run) are the user's to act on, like ours.
    return run_command(run, also=(MlflowException,))


if __name__ == "__main__":
    sys.exit(main())
