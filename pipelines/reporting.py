"""What a training prints about its run: its ID, what it holds and how to load each, and where the UI shows them."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

import tracking
from tracking import layout


def announce(client: MlflowClient, run: mlflow.ActiveRun) -> None:
    """Print the run's ID and experiment, and where to view it when the tracking server has a UI."""
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    print(f"MLflow run {run_id} (experiment {experiment_id})", flush=True)
    link = ui_link(client, f"experiments/{experiment_id}/runs/{run_id}")
    if link:
        print(f"view it at {link}", flush=True)


def report(
    client: MlflowClient,
    run: mlflow.ActiveRun,
    whole_model_id: str | None = None,
    config: tracking.TrackingConfig | None = None,
    lightning_epochs: bool = False,
) -> None:
    """Print what the run holds and how to load each: its latest and best checkpoints, the whole model
    (when one was logged), and where the UI shows them.

    ``lightning_epochs``: the checkpoints are keyed by Lightning's epoch, which counts from 0 (``epoch=0`` is the
    save at the first epoch's end); shown as the user counts, from 1, with Lightning's beside it."""
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    for which in ("latest", "best"):
        try:
            found = tracking.find_checkpoint(run_id, which, config=config)
        except tracking.NotFoundError:
            continue
        manifest = found.manifest
        at = f"step {manifest.step}" if manifest.keyed_by == layout.STEP else f"epoch {manifest.epoch}"
        if lightning_epochs and manifest.keyed_by == layout.EPOCH and manifest.epoch is not None:
            at = f"epoch {manifest.epoch + 1} (Lightning's epoch={manifest.epoch})"
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
