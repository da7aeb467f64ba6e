"""Probes beside the contenders: memory a save takes, the fixed cost of a tiny save, requests to find latest/best."""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch import nn

import tracking
from benchmarks.checkpoint_io.model import build_model, checkpoint_dict, new_sgd, seed_model
from benchmarks.checkpoint_io.report import FIXED_COST_BOUND_MS, MEMORY_BOUND, TARGET_MIN_BYTES
from benchmarks.checkpoint_io.runs import end_run, new_run, open_bench_run, raw_folder
from benchmarks.checkpoint_io.stack import Endpoint, Reclaimer
from tracking import layout

# log_checkpoint calls in flight while a run is filled with checkpoints; each mostly waits on
# the tracking server and S3, so a few threads cut the wait even on a two-CPU machine.
FILL_WORKERS = 8

# ------------------------------------------------------------------ memory, in a subprocess


def probe_memory(contender: str, target: int, run_id: str) -> dict[str, Any]:
    """Run in a fresh process: RSS growth while one checkpoint of ``target`` bytes is saved."""
    import resource

    import boto3

    model, optimizer = build_model(target)
    tiny, tiny_opt = build_model(4096)
    run = open_bench_run(run_id)
    client = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    key = run.key(f"{raw_folder('memory')}/{layout.CHECKPOINT_FILE}")
    # Warm up imports, clients and connection pools on a tiny checkpoint, so only the
    # save itself is measured.
    if contender == "ours":
        tracking.log_checkpoint(tiny, tiny_opt, epoch=1, run_id=run_id)
    else:
        warm = io.BytesIO()
        torch.save(checkpoint_dict(tiny, tiny_opt, 1), warm)
        warm.seek(0)
        client.upload_fileobj(warm, run.bucket, key)
    gc.collect()
    baseline = _rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = baseline
    stop = threading.Event()

    # ru_maxrss alone misses a peak below the process's earlier high-water mark (the model
    # build), so RSS is also sampled while the save runs.
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
        client.upload_fileobj(buffer, run.bucket, key)
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


def _rss() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_memory(label: str, target: int, endpoint: Endpoint, reclaimer: Reclaimer) -> dict[str, Any]:
    """Ours against raw boto3, each in a child process of its own: this one holds every size's model."""
    out: dict[str, Any] = {"label": label, "target_bytes": target}
    for contender in ("ours", "boto3"):
        run = new_run(f"bench-memory-{label}-{contender}")
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
                    run.run_id,
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
            end_run(run, reclaimer)
    ours = out["ours"]
    out["judged"] = target >= TARGET_MIN_BYTES
    out["pass"] = ours["ratio"] <= MEMORY_BOUND
    return out


# --------------------------------------------------------------- fixed cost and resolution


def measure_fixed_cost(saves: int, reclaimer: Reclaimer, log: Callable[[str], None]) -> dict[str, Any]:
    """Median wall time of one sync log_checkpoint of the seed model (Linear(6, 1) + SGD)."""
    model, optimizer = seed_model()
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    run = new_run("bench-seed")
    samples = []
    try:
        for epoch in range(saves + 3):
            start = time.perf_counter()
            tracking.log_checkpoint(
                model, optimizer, epoch=epoch, run_id=run.run_id, metrics={"loss": 1.0 / (1 + epoch)}
            )
            if epoch >= 3:  # the first saves pay for imports and new connections
                samples.append(time.perf_counter() - start)
    finally:
        end_run(run, reclaimer)
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

        from tracking.storage.s3_client import s3_client

        # The very client the library's loads use: it is cached per configuration.
        client = s3_client(tracking.TrackingConfig.from_env())
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
    model, optimizer = seed_model()
    counts: dict[str, dict[str, dict[str, int]]] = {}
    runs = []
    try:
        for n in (1, many):
            run = new_run(f"bench-resolve-{n}")
            runs.append(run)
            started = time.perf_counter()
            fill_checkpoints(run.run_id, model, optimizer, n)
            log(f"resolution: {n} checkpoints committed in {time.perf_counter() - started:.1f}s")
            for which in ("latest", "best"):
                counter = RequestCounter()
                with counter.counting():
                    loaded = tracking.load(run.run_id, which, model=model, optimizer=new_sgd)
                expected = n - 1 if which == "latest" else 0
                if loaded.epoch != expected:
                    raise RuntimeError(f"{which} of {n} checkpoints resolved to epoch {loaded.epoch}, not {expected}")
                counts.setdefault(which, {})[str(n)] = {"s3": counter.s3, "tracking": counter.tracking}
    finally:
        for run in runs:
            end_run(run, reclaimer)
    same = all(by_n["1"] == by_n[str(many)] for by_n in counts.values())
    return {"checkpoints": many, "requests": counts, "pass": same}


def fill_checkpoints(run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    """``n`` committed checkpoints, epochs 0..n-1, all through ``tracking.log_checkpoint``.

    The loss grows with the epoch, so best is epoch 0 and latest is epoch n-1. Epoch 0 is
    committed first and epoch n-1 last, each alone; the epochs between run in parallel
    (1,000 tiny saves took 40 s so on a two-CPU machine, 150 s one by one), and none of them
    can move best, since each finds epoch 0's better loss already recorded.
    """

    def log(epoch: int) -> None:
        metrics = {"loss": 1.0 + epoch}
        tracking.log_checkpoint(model, optimizer, epoch=epoch, run_id=run_id, metrics=metrics, monitor="loss")

    log(0)
    if n == 1:
        return
    with ThreadPoolExecutor(max_workers=FILL_WORKERS) as pool:
        list(pool.map(log, range(1, n - 1)))
    log(n - 1)
