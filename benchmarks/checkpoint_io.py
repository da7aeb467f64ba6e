"""Checkpoint I/O benchmark: our S3 fast path against raw boto3, naive MLflow and the plain-HTTP floor.

    python -m benchmarks.checkpoint_io [--sizes 16MB,512MB,2GB] [--rounds 5] [--quick] [--output PATH]

It starts a local stack of its own (SeaweedFS + MLflow server in ``.tracking/bench``, on ports
that do not clash with the defaults) and stops it at the end, or reuses the stack already
running there, or with ``--use-env`` the one the ``MLFLOW_*`` / ``AWS_*`` variables describe.
Every contender writes to the same endpoint, bucket and credentials, and every load ends with
the same ready model and optimizer. Contenders run interleaved, in a rotating order, for one
warm-up round and ``--rounds`` measured rounds; each one's objects are deleted right after it
is measured. Medians, ratios and PASS/FAIL against the targets are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast
from unittest import mock
from urllib.parse import urlsplit

import torch
from torch import nn

from tracking.store import BufferReader

DEFAULT_SIZES = "16MB,512MB,2GB"
QUICK_SIZES = "4MB,40MB"
DEFAULT_DATA_DIR = Path(".tracking/bench")
# Away from the defaults (8333, 5000) and below the integration tests' random range (20000+).
DEFAULT_S3_PORT = 18333
DEFAULT_MLFLOW_PORT = 18343
DEFAULT_OUTPUT = Path("benchmarks/results/checkpoint_io.json")
EXPERIMENT = "checkpoint-io-benchmark"
# Targets are judged on these sizes and up; smaller checkpoints are dominated by fixed costs.
TARGET_MIN_BYTES = 512 * 2**20
LAYERS = 8
SEED_SAVES = 20
MANY_CHECKPOINTS = 1000
# SeaweedFS frees deleted bytes only when a volume is vacuumed: do it once this much is deleted.
VACUUM_EVERY_BYTES = 1 << 30
_BLOCK = 8 * 2**20

CONTENDERS = ("floor", "boto3", "mlflow", "ours", "ours_async")
METRICS = {
    "floor_put": "floor: PUT of the pre-serialized bytes",
    "floor_get": "floor: GET into a preallocated buffer",
    "floor_load": "floor: GET + torch.load + load_state_dict",
    "boto3_save": "raw boto3: torch.save to BytesIO + upload_fileobj",
    "boto3_load": "raw boto3: download_fileobj + torch.load + load_state_dict",
    "mlflow_save": "naive MLflow: torch.save to a file + log_artifact",
    "mlflow_load": "naive MLflow: download_artifacts + torch.load + load_state_dict",
    "ours_save": "ours: log_checkpoint (sync)",
    "ours_load": "ours: tracking.load to a ready model + optimizer",
    "async_blocked": "ours async: training loop blocked",
    "async_durable": "ours async: until committed",
}


@dataclass(frozen=True)
class Target:
    """One ratio of medians with its bound: value <= bound passes."""

    name: str
    label: str
    numerator: str
    denominator: str
    bound: float


TARGETS = (
    Target("save_vs_boto3", "save, ours / raw boto3", "ours_save", "boto3_save", 0.85),
    Target("save_vs_mlflow", "save, ours / naive MLflow", "ours_save", "mlflow_save", 0.85),
    Target("save_vs_floor", "save, ours / floor PUT", "ours_save", "floor_put", 1.3),
    Target("load_vs_boto3", "load, ours / raw boto3", "ours_load", "boto3_load", 0.85),
    Target("load_vs_mlflow", "load, ours / naive MLflow", "ours_load", "mlflow_load", 0.8),
    Target("load_vs_floor", "load, ours / (floor GET + torch.load)", "ours_load", "floor_load", 1.3),
    Target("async_blocked", "async save: blocked / sync save", "async_blocked", "ours_save", 0.15),
    Target("async_durable", "async save: until durable / sync save", "async_durable", "ours_save", 1.2),
)
MEMORY_BOUND = 0.35
FIXED_COST_BOUND_MS = 50.0


# ----------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class Endpoint:
    """Where the benchmark sends its bytes, and how to reclaim them on SeaweedFS."""

    env: dict[str, str]
    master_url: str | None
    started: bool

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def s3_endpoint_url(self) -> str:
        return self.env["MLFLOW_S3_ENDPOINT_URL"]


@contextmanager
def bench_stack(args: argparse.Namespace) -> Iterator[Endpoint]:
    """The stack to measure against; stops it afterwards only if it was started here."""
    if args.use_env:
        env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))}
        missing = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} - set(env)
        if missing:
            raise SystemExit(f"--use-env needs {', '.join(sorted(missing))} set (e.g. from `tracking stack up`)")
        yield Endpoint(env, args.master_url, started=False)
        return
    from tracking.config import TrackingConfig
    from tracking.localstack import LocalStack

    # TrackingConfig() rather than from_env(): the bench stack uses its built-in local
    # credentials, never whatever AWS_* the calling shell holds.
    stack = LocalStack(TrackingConfig(), args.data_dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port)
    started = stack.up()
    try:
        yield Endpoint(stack.env(), stack.master_url, started=bool(started))
    finally:
        if started:
            stack.down()


@contextmanager
def client_env(endpoint: Endpoint) -> Iterator[None]:
    """Point tracking, MLflow and boto3 in this process at the endpoint (undone afterwards)."""
    import mlflow

    # MLflow prints a "View run" link for every run ended; the tables are the output here.
    env = {**endpoint.env, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mlflow.set_tracking_uri(endpoint.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the variable
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Reclaimer:
    """Deletes objects as soon as they are measured, and vacuums SeaweedFS now and then."""

    def __init__(self, client: Any, master_url: str | None) -> None:
        self.client = client
        self.master_url = master_url
        self.pending = 0
        self.vacuums = 0

    def delete(self, bucket: str, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=bucket, Key=obj["Key"])
                self.pending += int(obj["Size"])

    def maybe_vacuum(self, force: bool = False) -> None:
        if self.master_url is None or not (force or self.pending >= VACUUM_EVERY_BYTES):
            return
        # Synchronous on the master: it returns once the volumes are compacted.
        url = f"{self.master_url}/vol/vacuum?garbageThreshold=0.0001"
        with urllib.request.urlopen(url, timeout=600) as response:
            response.read()
        self.pending = 0
        self.vacuums += 1


# ---------------------------------------------------------------------------- the model


def parse_size(text: str) -> int:
    """``16MB`` -> 16 MiB, ``2GB`` -> 2 GiB (binary units), ``1024`` -> bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    clean = text.strip().upper()
    for suffix, factor in units.items():
        if clean.endswith(suffix) and clean[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(clean[: -len(suffix)]) * factor)
    if clean.isdigit():
        return int(clean)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 16MB or 2GB")


def build_model(target_bytes: int) -> tuple[nn.Sequential, torch.optim.Adam]:
    """Linear layers sized so weights + Adam's two moments come to about ``target_bytes``.

    One optimizer step creates Adam's state; gradients are dropped, as after ``zero_grad``.
    """
    width = max(8, math.isqrt(target_bytes // (12 * LAYERS)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def checkpoint_dict(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
    """The seed notes' checkpoint, as the raw contenders save it."""
    return {"epoch": epoch, "model_state": model.state_dict(), "optim_state": optimizer.state_dict()}


def restore(data: BinaryIO | str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = torch.load(data, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optim_state"])


def new_adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


# ------------------------------------------------------------------------ the contenders


@dataclass
class Case:
    """One checkpoint size: the live objects, their serialized bytes and where runs store them."""

    label: str
    model: nn.Sequential
    optimizer: torch.optim.Adam
    serialized: memoryview
    run_id: str
    bucket: str
    prefix: str  # the run's artifact root key, without a trailing slash
    samples: dict[str, list[float]] = field(default_factory=dict)

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}"

    def record(self, metric: str, seconds: float) -> None:
        self.samples.setdefault(metric, []).append(seconds)


class Contenders:
    """Each contender's save and load, timed; objects are deleted right after a measurement."""

    def __init__(self, endpoint: Endpoint, reclaimer: Reclaimer) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.reclaimer = reclaimer
        region = endpoint.env.get("AWS_DEFAULT_REGION", "us-east-1")
        credentials: dict[str, Any] = {
            "aws_access_key_id": endpoint.env.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": endpoint.env.get("AWS_SECRET_ACCESS_KEY"),
            "region_name": region,
        }
        # "A default boto3 client": no tuning at all, as a user would write it.
        self.boto3 = boto3.client("s3", endpoint_url=endpoint.s3_endpoint_url, **credentials)
        # Only signs URLs for the floor; it never sends a byte itself.
        self.signer = boto3.client(
            "s3",
            endpoint_url=endpoint.s3_endpoint_url,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            **credentials,
        )

    def run(self, name: str, case: Case, epoch: int, measure: bool) -> None:
        runner: Callable[[Case, int, bool], None] = getattr(self, f"_{name}")
        # Write back what the previous contender left dirty in the page cache (SeaweedFS's
        # volumes, MLflow's temp file): else its writeback throttles whoever comes next.
        os.sync()
        try:
            runner(case, epoch, measure)
        finally:
            self.reclaimer.delete(case.bucket, case.key(f"bench/{name}/"))
            self.reclaimer.delete(case.bucket, case.key(f"checkpoints/epoch_{epoch:04d}/"))
            gc.collect()

    # -- floor: the same bytes, already serialized, over one plain HTTP request each way

    def _floor(self, case: Case, epoch: int, measure: bool) -> None:
        key = case.key(f"bench/floor/epoch_{epoch:04d}/checkpoint.pt")
        start = time.perf_counter()
        self._put(case.bucket, key, case.serialized)
        put = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        buffer = self._get(case.bucket, key, len(case.serialized))
        got = time.perf_counter() - start
        restore(cast(BinaryIO, BufferReader(buffer)), case.model, case.optimizer)
        loaded = time.perf_counter() - start
        del buffer
        if measure:
            case.record("floor_put", put)
            case.record("floor_get", got)
            case.record("floor_load", loaded)

    def _put(self, bucket: str, key: str, data: memoryview) -> None:
        url = urlsplit(self.signer.generate_presigned_url("put_object", {"Bucket": bucket, "Key": key}, 3600))
        conn = http.client.HTTPConnection(str(url.hostname), url.port, timeout=600)
        try:
            conn.putrequest("PUT", f"{url.path}?{url.query}", skip_accept_encoding=True)
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders()
            for start in range(0, len(data), _BLOCK):
                conn.send(data[start : start + _BLOCK])
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"floor PUT {key}: HTTP {response.status}: {body[:300]!r}")
        finally:
            conn.close()

    def _get(self, bucket: str, key: str, size: int) -> bytearray:
        url = urlsplit(self.signer.generate_presigned_url("get_object", {"Bucket": bucket, "Key": key}, 3600))
        conn = http.client.HTTPConnection(str(url.hostname), url.port, timeout=600)
        try:
            conn.request("GET", f"{url.path}?{url.query}")
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"floor GET {key}: HTTP {response.status}: {response.read()[:300]!r}")
            buffer = bytearray(size)
            view = memoryview(buffer)
            filled = 0
            while filled < size:
                n = response.readinto(view[filled : filled + _BLOCK])
                if not n:
                    raise RuntimeError(f"floor GET {key}: ended after {filled} of {size} bytes")
                filled += n
            return buffer
        finally:
            conn.close()

    # -- raw boto3: torch.save into memory, upload_fileobj; download_fileobj, torch.load

    def _boto3(self, case: Case, epoch: int, measure: bool) -> None:
        key = case.key(f"bench/boto3/epoch_{epoch:04d}/checkpoint.pt")
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(checkpoint_dict(case.model, case.optimizer, epoch), buffer)
        buffer.seek(0)
        self.boto3.upload_fileobj(buffer, case.bucket, key)
        saved = time.perf_counter() - start
        del buffer
        gc.collect()
        start = time.perf_counter()
        buffer = io.BytesIO()
        self.boto3.download_fileobj(case.bucket, key, buffer)
        buffer.seek(0)
        restore(buffer, case.model, case.optimizer)
        loaded = time.perf_counter() - start
        del buffer
        if measure:
            case.record("boto3_save", saved)
            case.record("boto3_load", loaded)

    # -- naive MLflow: torch.save to a temp file, log_artifact; download_artifacts, torch.load

    def _mlflow(self, case: Case, epoch: int, measure: bool) -> None:
        import mlflow

        folder = f"bench/mlflow/epoch_{epoch:04d}"
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            path = os.path.join(tmp, "checkpoint.pt")
            torch.save(checkpoint_dict(case.model, case.optimizer, epoch), path)
            mlflow.log_artifact(path, folder, run_id=case.run_id)
        saved = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=case.run_id, artifact_path=f"{folder}/checkpoint.pt", dst_path=tmp
            )
            restore(local, case.model, case.optimizer)
        loaded = time.perf_counter() - start
        if measure:
            case.record("mlflow_save", saved)
            case.record("mlflow_load", loaded)

    # -- ours: tracking.log_checkpoint and tracking.load

    def _ours(self, case: Case, epoch: int, measure: bool) -> None:
        import tracking

        start = time.perf_counter()
        tracking.log_checkpoint(case.model, case.optimizer, epoch=epoch, run_id=case.run_id)
        saved = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        loaded = tracking.load(case.run_id, epoch, model=case.model, optimizer=new_adam, mode="train")
        took = time.perf_counter() - start
        if not loaded.optimizer or len(loaded.optimizer.state) != len(list(case.model.parameters())):
            raise RuntimeError("tracking.load did not restore the optimizer state")
        case.optimizer = cast(torch.optim.Adam, loaded.optimizer)
        if measure:
            case.record("ours_save", saved)
            case.record("ours_load", took)

    def _ours_async(self, case: Case, epoch: int, measure: bool) -> None:
        import tracking

        start = time.perf_counter()
        future = tracking.log_checkpoint(case.model, case.optimizer, epoch=epoch, run_id=case.run_id, blocking=False)
        blocked = time.perf_counter() - start
        future.result()
        durable = time.perf_counter() - start
        if measure:
            case.record("async_blocked", blocked)
            case.record("async_durable", durable)


# --------------------------------------------------------------------------- measuring


def new_run(name: str) -> tuple[str, str, str]:
    """A run in the benchmark experiment: its ID, and its artifact root's bucket and key."""
    import mlflow
    from mlflow import MlflowClient

    from tracking.uri import parse_s3_uri

    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=name)
    uri = run.info.artifact_uri
    if not uri.startswith("s3://"):
        raise SystemExit(
            f"the runs' artifact root is {uri}, not s3://: the stack proxies artifacts, so there is no "
            "S3 fast path to measure; use a stack started without --serve-artifacts"
        )
    root = parse_s3_uri(uri)
    return run.info.run_id, root.bucket, root.key.rstrip("/")


def end_run(run_id: str, reclaimer: Reclaimer) -> None:
    """Delete a benchmark run's objects, then the run itself (soft-deleted, like the UI does)."""
    from mlflow import MlflowClient

    bucket, prefix = _artifact_root(run_id)
    reclaimer.delete(bucket, f"{prefix}/")
    MlflowClient().set_terminated(run_id)
    MlflowClient().delete_run(run_id)


def measure_size(
    label: str, target: int, rounds: int, contenders: Contenders, log: Callable[[str], None]
) -> dict[str, Any]:
    model, optimizer = build_model(target)
    serialized = io.BytesIO()
    torch.save(checkpoint_dict(model, optimizer, 0), serialized)
    run_id, bucket, prefix = new_run(f"bench-{label}")
    case = Case(label, model, optimizer, serialized.getbuffer(), run_id, bucket, prefix)
    log(f"{label}: {len(case.serialized) / 2**20:.1f} MiB checkpoint, run {run_id}")
    try:
        for round_no in range(rounds + 1):
            shift = round_no % len(CONTENDERS)
            order = CONTENDERS[shift:] + CONTENDERS[:shift]
            started = time.perf_counter()
            for position, name in enumerate(order):
                contenders.run(name, case, epoch=round_no * 10 + position, measure=round_no > 0)
            contenders.reclaimer.maybe_vacuum()
            what = "warm-up" if round_no == 0 else f"round {round_no}/{rounds}"
            log(f"{label}: {what} took {time.perf_counter() - started:.1f}s")
    finally:
        end_run(run_id, contenders.reclaimer)
    medians = {metric: statistics.median(values) for metric, values in case.samples.items()}
    return {
        "label": label,
        "target_bytes": target,
        "checkpoint_bytes": len(case.serialized),
        "parameters": sum(p.numel() for p in model.parameters()),
        "medians_s": medians,
        "samples_s": case.samples,
        "ratios": ratios(medians, judged=target >= TARGET_MIN_BYTES),
    }


def ratios(medians: Mapping[str, float], judged: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        value = medians[target.numerator] / medians[target.denominator]
        out[target.name] = {
            "label": target.label,
            "value": value,
            "bound": target.bound,
            "judged": judged,
            "pass": value <= target.bound,
        }
    return out


# ------------------------------------------------------------------ memory, in a subprocess


def probe_memory(contender: str, target: int, run_id: str) -> dict[str, Any]:
    """Run in a fresh process: RSS growth while one checkpoint of ``target`` bytes is saved."""
    import resource

    import boto3

    import tracking

    model, optimizer = build_model(target)
    tiny, tiny_opt = build_model(4096)
    bucket, prefix = _artifact_root(run_id)
    client = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    key = f"{prefix}/bench/memory/checkpoint.pt"
    # Warm up imports, clients and connection pools on a tiny checkpoint, so only the
    # save itself is measured.
    if contender == "ours":
        tracking.log_checkpoint(tiny, tiny_opt, epoch=1, run_id=run_id)
    else:
        warm = io.BytesIO()
        torch.save(checkpoint_dict(tiny, tiny_opt, 1), warm)
        warm.seek(0)
        client.upload_fileobj(warm, bucket, key)
    gc.collect()
    baseline = _rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if contender == "ours":
        tracking.log_checkpoint(model, optimizer, epoch=2, run_id=run_id)
    else:
        buffer = io.BytesIO()
        torch.save(checkpoint_dict(model, optimizer, 2), buffer)
        buffer.seek(0)
        client.upload_fileobj(buffer, bucket, key)
        del buffer
    took = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak = max(peak, _rss())
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = io.BytesIO()
    torch.save(checkpoint_dict(model, optimizer, 2), size)
    growth = max(peak - baseline, maxrss_after - maxrss_before)
    return {
        "contender": contender,
        "checkpoint_bytes": size.tell(),
        "baseline_rss": baseline,
        "peak_rss_sampled": peak,
        "maxrss_growth": maxrss_after - maxrss_before,
        "growth_bytes": growth,
        "ratio": growth / size.tell(),
        "seconds": took,
    }


def _artifact_root(run_id: str) -> tuple[str, str]:
    from mlflow import MlflowClient

    from tracking.uri import parse_s3_uri

    root = parse_s3_uri(MlflowClient().get_run(run_id).info.artifact_uri)
    return root.bucket, root.key.rstrip("/")


def _rss() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_memory(label: str, target: int, endpoint: Endpoint, reclaimer: Reclaimer) -> dict[str, Any]:
    out: dict[str, Any] = {"label": label, "target_bytes": target}
    for contender in ("ours", "boto3"):
        run_id, _, _ = new_run(f"bench-memory-{label}-{contender}")
        try:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.checkpoint_io",
                    "--probe-memory",
                    contender,
                    "--probe-bytes",
                    str(target),
                    "--probe-run",
                    run_id,
                ],
                env={**os.environ, **endpoint.env},
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if child.returncode != 0:
                raise RuntimeError(f"memory probe ({contender}, {label}) failed:\n{child.stderr[-3000:]}")
            out[contender] = json.loads(child.stdout.strip().splitlines()[-1])
        finally:
            end_run(run_id, reclaimer)
    ours = out["ours"]
    out["judged"] = target >= TARGET_MIN_BYTES
    out["pass"] = ours["ratio"] <= MEMORY_BOUND
    return out


# --------------------------------------------------------------- fixed cost and resolution


def measure_fixed_cost(saves: int, reclaimer: Reclaimer, log: Callable[[str], None]) -> dict[str, Any]:
    """Median wall time of one sync log_checkpoint of the seed model (Linear(6, 1) + SGD)."""
    import tracking
    from pipelines.models import Model

    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    run_id, _, _ = new_run("bench-seed")
    samples = []
    try:
        for epoch in range(saves + 3):
            start = time.perf_counter()
            tracking.log_checkpoint(model, optimizer, epoch=epoch, run_id=run_id, metrics={"loss": 1.0 / (1 + epoch)})
            if epoch >= 3:  # the first saves pay for imports and new connections
                samples.append(time.perf_counter() - start)
    finally:
        end_run(run_id, reclaimer)
    median_ms = statistics.median(samples) * 1000
    log(f"seed model: one sync checkpoint takes {median_ms:.1f} ms (median of {saves})")
    return {
        "median_ms": median_ms,
        "samples_ms": [s * 1000 for s in samples],
        "bound_ms": FIXED_COST_BOUND_MS,
        "pass": median_ms <= FIXED_COST_BOUND_MS,
    }


class RequestCounter:
    """Counts S3 requests of tracking's cached client and HTTP requests to the tracking server."""

    def __init__(self) -> None:
        self.s3 = 0
        self.tracking = 0

    @contextmanager
    def counting(self) -> Iterator[RequestCounter]:
        import requests

        from tracking.config import TrackingConfig
        from tracking.store import s3_client

        client = s3_client(TrackingConfig.from_env())
        real_send = requests.Session.send

        def on_s3(**_: Any) -> None:
            self.s3 += 1

        def send(session: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
            self.tracking += 1
            return real_send(session, request, **kwargs)

        client.meta.events.register("before-send.s3", on_s3, unique_id="bench-counter")
        try:
            with mock.patch.object(requests.Session, "send", send):
                yield self
        finally:
            client.meta.events.unregister("before-send.s3", unique_id="bench-counter")


def measure_resolution(many: int, reclaimer: Reclaimer, log: Callable[[str], None]) -> dict[str, Any]:
    """Requests made by ``tracking.load(run, "latest"/"best")`` with 1 and with ``many`` checkpoints."""
    from pipelines.models import Model

    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    runs = []
    try:
        for n in (1, many):
            run_id, _, _ = new_run(f"bench-resolve-{n}")
            runs.append(run_id)
            started = time.perf_counter()
            fill_checkpoints(run_id, model, optimizer, n)
            log(f"resolution: {n} checkpoints committed in {time.perf_counter() - started:.1f}s")
            for which in ("latest", "best"):
                counter = RequestCounter()
                with counter.counting():
                    loaded = _load_tiny(run_id, which, model)
                expected = n - 1 if which == "latest" else 0
                if loaded.epoch != expected:
                    raise RuntimeError(f"{which} of {n} checkpoints resolved to epoch {loaded.epoch}, not {expected}")
                counts.setdefault(which, {})[str(n)] = {"s3": counter.s3, "tracking": counter.tracking}
    finally:
        for run_id in runs:
            end_run(run_id, reclaimer)
    same = all(by_n["1"] == by_n[str(many)] for by_n in counts.values())
    return {"checkpoints": many, "requests": counts, "pass": same}


def _load_tiny(run_id: str, which: str, model: nn.Module) -> Any:
    import tracking

    return tracking.load(run_id, which, model=model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def fill_checkpoints(run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    """``n`` committed checkpoints, epochs 0..n-1: the first and last through log_checkpoint
    (which moves the tags: best stays at epoch 0), the rest written straight through the store."""
    import tracking
    from tracking.checkpoint import CHECKPOINT_FILE, checkpoint_dir, snapshot_checkpoint
    from tracking.manifest import MANIFEST_NAME
    from tracking.run import open_run

    def loss(epoch: int) -> dict[str, float]:
        return {"loss": 1.0 + epoch}  # grows: the best checkpoint is the first one

    tracking.log_checkpoint(model, optimizer, epoch=0, run_id=run_id, metrics=loss(0), monitor="loss")
    if n == 1:
        return
    handle = open_run(run_id)

    def commit(epoch: int) -> None:
        snapshot = snapshot_checkpoint(model, optimizer, epoch=epoch, metrics=loss(epoch), monitor="loss")
        data = io.BytesIO()
        torch.save(snapshot.payload, data)
        folder = checkpoint_dir(epoch)
        stored = handle.store.write_bytes(f"{folder}/{CHECKPOINT_FILE}", data.getvalue())
        snapshot.manifest.files = {CHECKPOINT_FILE: stored}
        handle.store.write_bytes(f"{folder}/{MANIFEST_NAME}", snapshot.manifest.to_json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(commit, range(1, n - 1)))
    tracking.log_checkpoint(model, optimizer, epoch=n - 1, run_id=run_id, metrics=loss(n - 1), monitor="loss")


# ------------------------------------------------------------------------------ reporting


def report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
    console = Console(width=max(Console().width, 130))
    sizes = results["sizes"]
    medians = Table(title="checkpoint I/O: median seconds (lower is better)")
    medians.add_column("what")
    for size in sizes:
        medians.add_column(f"{size['label']} ({size['checkpoint_bytes'] / 2**20:.0f} MiB)", justify="right")
    for metric, label in METRICS.items():
        medians.add_row(label, *(f"{size['medians_s'][metric]:.3f}" for size in sizes))
    console.print(medians)

    targets = Table(title="ratios of medians (targets judged at 512 MiB and up)")
    targets.add_column("ratio")
    targets.add_column("target", justify="right")
    for size in sizes:
        targets.add_column(size["label"], justify="right")
    for target in TARGETS:
        cells = [_verdict(size["ratios"][target.name]) for size in sizes]
        targets.add_row(target.label, f"<= {target.bound}", *cells)
    memory = {m["label"]: m for m in results["memory"]}
    cells = []
    for size in sizes:
        m = memory.get(size["label"])
        if m is None:
            cells.append("-")
            continue
        verdict = _mark(m["pass"], m["judged"])
        cells.append(f"{m['ours']['ratio']:.3f} {verdict} (boto3 {m['boto3']['ratio']:.2f})")
    targets.add_row("save peak RSS growth / bytes, ours", f"<= {MEMORY_BOUND}", *cells)
    flat = results["memory_not_growing"]
    targets.add_row(
        "save peak RSS growth not growing with size",
        "flat",
        *([""] * (len(sizes) - 1)),
        f"{flat['detail']} {_mark(flat['pass'], flat['judged'])}",
    )
    console.print(targets)

    fixed = results["fixed_cost"]
    resolution = results["resolution"]
    singles = Table(title="fixed costs")
    singles.add_column("what")
    singles.add_column("target")
    singles.add_column("measured")
    singles.add_row(
        "seed model: one sync checkpoint (median)",
        f"<= {FIXED_COST_BOUND_MS:.0f} ms",
        f"{fixed['median_ms']:.1f} ms {_mark(fixed['pass'], True)}",
    )
    for which, by_n in resolution["requests"].items():
        described = ", ".join(f"{n}: {c['s3']} S3 + {c['tracking']} tracking" for n, c in by_n.items())
        singles.add_row(
            f"requests to load {which!r}, 1 vs {resolution['checkpoints']} checkpoints",
            "same",
            f"{described} {_mark(by_n['1'] == by_n[str(resolution['checkpoints'])], True)}",
        )
    console.print(singles)
    console.print(f"results: {results['output']}  (total {results['meta']['seconds']:.0f}s)")


def _verdict(ratio: Mapping[str, Any]) -> str:
    return f"{ratio['value']:.3f} {_mark(ratio['pass'], ratio['judged'])}"


def _mark(passed: bool, judged: bool) -> str:
    if not judged:
        return "(info)"
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def memory_flatness(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat: at the largest size a save grows RSS by at most 1.5x (+ 32 MiB of noise) what it
    grows at the next size down, though the checkpoint is several times larger."""
    pool = sorted(memory, key=lambda m: m["target_bytes"])
    if len(pool) < 2:
        return {"pass": True, "judged": False, "detail": "one size only"}
    small, large = pool[-2]["ours"]["growth_bytes"], pool[-1]["ours"]["growth_bytes"]
    return {
        "pass": large <= 1.5 * small + 32 * 2**20,
        "judged": pool[-2]["judged"],
        "detail": f"{pool[-2]['label']} {small / 2**20:.1f} MiB -> {pool[-1]['label']} {large / 2**20:.1f} MiB",
        "growth_bytes": [small, large],
    }


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_io", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help=f"checkpoint sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds after one warm-up (default 5)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}, 2 rounds, fewer saves")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--use-env", action="store_true", help="use the stack the MLFLOW_*/AWS_* variables describe")
    parser.add_argument("--master-url", default=None, help="with --use-env: SeaweedFS master URL, to vacuum")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"bench stack (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT)
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT)
    parser.add_argument("--probe-memory", choices=("ours", "boto3"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")]
    for size in args.sizes:
        parse_size(size)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(args.probe_memory, args.probe_bytes, args.probe_run)))
        return 0
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {message}", file=sys.stderr, flush=True)

    from tracking.config import TrackingConfig

    with bench_stack(args) as endpoint, client_env(endpoint):
        log(
            f"stack: S3 {endpoint.s3_endpoint_url}, tracking {endpoint.tracking_uri}"
            f" ({'started here' if endpoint.started else 'reused'})"
        )
        reclaimer = Reclaimer(None, endpoint.master_url)
        contenders = Contenders(endpoint, reclaimer)
        reclaimer.client = contenders.boto3
        config = TrackingConfig.from_env()
        sizes, memory = [], []
        for label in args.sizes:
            target = parse_size(label)
            sizes.append(measure_size(label, target, args.rounds, contenders, log))
            memory.append(measure_memory(label, target, endpoint, reclaimer))
            reclaimer.maybe_vacuum(force=True)
            log(f"{label}: memory ours {memory[-1]['ours']['ratio']:.3f}, boto3 {memory[-1]['boto3']['ratio']:.3f}")
        fixed = measure_fixed_cost(5 if args.quick else SEED_SAVES, reclaimer, log)
        resolution = measure_resolution(50 if args.quick else MANY_CHECKPOINTS, reclaimer, log)
        reclaimer.maybe_vacuum(force=True)
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m benchmarks.checkpoint_io", *(argv if argv is not None else sys.argv[1:])]),
            "rounds": args.rounds,
            "warmup_rounds": 1,
            "sizes": args.sizes,
            "stack_started_here": endpoint.started,
            "part_size_mb": config.part_size_mb,
            "max_concurrency": config.max_concurrency,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "vacuums": reclaimer.vacuums,
            "seconds": time.perf_counter() - began,
        },
        "contenders": list(CONTENDERS),
        "metrics": METRICS,
        "sizes": sizes,
        "memory": memory,
        "memory_not_growing": memory_flatness(memory),
        "fixed_cost": fixed,
        "resolution": resolution,
        "output": str(args.output),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
