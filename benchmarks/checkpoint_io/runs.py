"""The MLflow runs the benchmark measures into, and where their artifacts sit in the bucket."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from benchmarks.checkpoint_io.stack import Reclaimer

EXPERIMENT = "checkpoint-io-benchmark"
# The raw contenders (floor, boto3, naive MLflow) write below this folder of the run, in the
# library's own epoch/file shape, so that their keys are as long and as many as ours but can
# never be taken for a committed checkpoint.
RAW_FOLDER = "bench"


@dataclass(frozen=True)
class BenchRun:
    """A run's ID, and its artifact root's bucket and key prefix (without a trailing slash)."""

    run_id: str
    bucket: str
    prefix: str

    def key(self, path: str) -> str:
        """The bucket key of ``path``, relative to the run's artifact root."""
        return f"{self.prefix}/{path}"


def raw_folder(contender: str) -> str:
    """Where a raw contender stores its files in a run, relative to the artifact root."""
    return f"{RAW_FOLDER}/{contender}"


def new_run(name: str) -> BenchRun:
    """A new run in the benchmark experiment."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=name)
    return _bench_run(run.info.run_id, run.info.artifact_uri)


def open_bench_run(run_id: str) -> BenchRun:
    """An existing run, by ID (the memory probe's child process gets only that)."""
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    return _bench_run(run_id, run.info.artifact_uri)


def end_run(run: BenchRun, reclaimer: Reclaimer) -> None:
    """Delete a benchmark run's objects (its checkpoints' too), then the run itself (soft-deleted, like the UI does)."""
    from mlflow import MlflowClient

    from tracking import catalog
    from tracking.run import open_run

    for checkpoint in catalog.search(open_run(run.run_id), status=None):
        bucket, _, key = checkpoint.artifact_uri.removeprefix("s3://").partition("/")
        reclaimer.delete(bucket, key.rstrip("/") + "/")
    reclaimer.delete(run.bucket, f"{run.prefix}/")
    MlflowClient().set_terminated(run.run_id)
    MlflowClient().delete_run(run.run_id)


def _bench_run(run_id: str, artifact_uri: str) -> BenchRun:
    parts = urlsplit(artifact_uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise SystemExit(
            f"the runs' artifact root is {artifact_uri}, not s3://: the stack proxies artifacts, so there is "
            "no S3 fast path to measure; use a stack started without --serve-artifacts"
        )
    return BenchRun(run_id, parts.netloc, parts.path.strip("/"))
