"""Evaluate a trained run's model on its validation data, and log the result to the run.

    python -m pipelines.evaluate --run-id RUN_ID [--checkpoint latest|best|N]

The model is rebuilt by `tracking.load` in eval mode; the run's `dataset` param says
which data. Metrics are logged as `eval_loss` and `eval_accuracy` at the checkpoint's
epoch through the client, so a finished run stays finished.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import tracking
from pipelines import data, digits, runs, train, training
from tracking.errors import run_command

TASKS = {task.dataset: task for task in (train.TASK, digits.TASK)}


def evaluate(source: str, checkpoint: str | int = "latest") -> dict[str, float]:
    """Validation loss and accuracy of a run's checkpoint, also logged to the run as ``eval_*`` metrics."""
    config = tracking.TrackingConfig.from_env()
    client = MlflowClient(config.tracking_uri)
    run = runs.find_run(client, source, config)
    dataset = run.data.params.get("dataset")
    if dataset not in TASKS:
        raise runs.PipelineError(
            f"run {run.info.run_id} has dataset param {dataset!r}; evaluate knows {sorted(TASKS)}, "
            "i.e. runs of pipelines.train and pipelines.digits."
        )
    task = TASKS[dataset]
    loaded = tracking.load(run.info.run_id, checkpoint, mode="eval")
    split = data.load(task.dataset)
    loss, accuracy = training.measure(task, loaded.model, split.x_val, split.y_val)
    metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value, step=loaded.epoch or 0)
    print(
        f"run {run.info.run_id} {loaded.path} (epoch {loaded.epoch}): "
        + " ".join(f"{name}={value:.6f}" for name, value in metrics.items())
    )
    return metrics


def _checkpoint(text: str) -> str | int:
    if text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected latest, best or an epoch number, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-id", required=True, help="run ID, runs:/<id> or models:/<name>@<alias>")
    parser.add_argument(
        "--checkpoint", type=_checkpoint, default="latest", help="latest, best or an epoch number (default: latest)"
    )
    args = parser.parse_args(argv)
    # MLflow's own errors (a refused request, an unknown run) are the user's to act on, like ours.
    return run_command(lambda: evaluate(args.run_id, args.checkpoint), also=(MlflowException,))


if __name__ == "__main__":
    sys.exit(main())
