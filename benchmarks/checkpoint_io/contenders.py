"""The contenders, each saving and loading the same checkpoint: floor, raw boto3, naive MLflow, ours (sync, async)."""

from __future__ import annotations

import gc
import http.client
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

import torch
from torch import nn

import tracking
from benchmarks.checkpoint_io.model import build_model, checkpoint_dict, new_adam, restore
from benchmarks.checkpoint_io.report import TARGET_MIN_BYTES, ratios
from benchmarks.checkpoint_io.runs import BenchRun, end_run, new_run, raw_folder
from benchmarks.checkpoint_io.stack import Endpoint, Reclaimer
from tracking import layout
from tracking.storage import BufferReader

CONTENDERS = ("floor", "boto3", "mlflow", "ours", "ours_async")
# The floor sends and receives in blocks of this size: large enough that Python's overhead per
# block vanishes, small enough that no block is copied into a second large buffer.
_BLOCK = 8 * 2**20


@dataclass
class Case:
    """One checkpoint size: the live objects, their serialized bytes and the run that stores them."""

    label: str
    model: nn.Sequential
    optimizer: torch.optim.Adam
    serialized: memoryview
    run: BenchRun
    samples: dict[str, list[float]] = field(default_factory=dict)

    def record(self, metric: str, seconds: float) -> None:
        self.samples.setdefault(metric, []).append(seconds)


def raw_checkpoint_path(contender: str, epoch: int) -> str:
    """A raw contender's checkpoint file for ``epoch``, below its own folder."""
    return f"{raw_folder(contender)}/epoch_{epoch:04d}/{layout.CHECKPOINT_FILE}"


class Contenders:
    """Each contender's save and load, timed; objects are deleted right after a measurement."""

    def __init__(self, endpoint: Endpoint, boto3_client: Any, reclaimer: Reclaimer) -> None:
        from botocore.config import Config

        self.endpoint = endpoint
        self.reclaimer = reclaimer
        # "A default boto3 client": no tuning at all, as a user would write it.
        self.boto3 = boto3_client
        # Only signs URLs for the floor; it never sends a byte itself.
        self.signer = endpoint.boto3_client(config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        # Where our contenders' checkpoints went (their logged models' artifact locations), to reclaim.
        self.written: list[str] = []

    def run(self, name: str, case: Case, epoch: int, measure: bool) -> None:
        runner: Callable[[Case, int, bool], None] = getattr(self, f"_{name}")
        # Write back what the previous contender left dirty in the page cache (SeaweedFS's
        # volumes, MLflow's temp file): else its writeback throttles whoever comes next.
        os.sync()
        try:
            runner(case, epoch, measure)
        finally:
            self.reclaimer.delete(case.run.bucket, case.run.key(f"{raw_folder(name)}/"))
            while self.written:
                bucket, _, key = self.written.pop().removeprefix("s3://").partition("/")
                self.reclaimer.delete(bucket, key.rstrip("/") + "/")
            gc.collect()

    # -- floor: the same bytes, already serialized, over one plain HTTP request each way

    def _floor(self, case: Case, epoch: int, measure: bool) -> None:
        key = case.run.key(raw_checkpoint_path("floor", epoch))
        start = time.perf_counter()
        self._put(case.run.bucket, key, case.serialized)
        put = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        buffer = self._get(case.run.bucket, key, len(case.serialized))
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
        key = case.run.key(raw_checkpoint_path("boto3", epoch))
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(checkpoint_dict(case.model, case.optimizer, epoch), buffer)
        buffer.seek(0)
        self.boto3.upload_fileobj(buffer, case.run.bucket, key)
        saved = time.perf_counter() - start
        del buffer
        gc.collect()
        start = time.perf_counter()
        buffer = io.BytesIO()
        self.boto3.download_fileobj(case.run.bucket, key, buffer)
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

        path = raw_checkpoint_path("mlflow", epoch)
        folder, _, name = path.rpartition("/")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            local = os.path.join(tmp, name)
            torch.save(checkpoint_dict(case.model, case.optimizer, epoch), local)
            mlflow.log_artifact(local, folder, run_id=case.run.run_id)
        saved = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=case.run.run_id, artifact_path=path, dst_path=tmp)
            restore(local, case.model, case.optimizer)
        loaded = time.perf_counter() - start
        if measure:
            case.record("mlflow_save", saved)
            case.record("mlflow_load", loaded)

    # -- ours: tracking.log_checkpoint and tracking.load

    def _ours(self, case: Case, epoch: int, measure: bool) -> None:
        run_id = case.run.run_id
        start = time.perf_counter()
        logged = tracking.log_checkpoint(case.model, case.optimizer, epoch=epoch, run_id=run_id)
        saved = time.perf_counter() - start
        self.written.append(str(logged.artifact_uri))
        gc.collect()
        start = time.perf_counter()
        loaded = tracking.load(run_id, epoch, model=case.model, optimizer=new_adam, mode="train")
        took = time.perf_counter() - start
        if not loaded.optimizer or len(loaded.optimizer.state) != len(list(case.model.parameters())):
            raise RuntimeError("tracking.load did not restore the optimizer state")
        case.optimizer = cast(torch.optim.Adam, loaded.optimizer)
        if measure:
            case.record("ours_save", saved)
            case.record("ours_load", took)

    def _ours_async(self, case: Case, epoch: int, measure: bool) -> None:
        start = time.perf_counter()
        future = tracking.log_checkpoint(
            case.model, case.optimizer, epoch=epoch, run_id=case.run.run_id, blocking=False
        )
        blocked = time.perf_counter() - start
        logged = future.result()
        durable = time.perf_counter() - start
        self.written.append(str(logged.artifact_uri))
        if measure:
            case.record("async_blocked", blocked)
            case.record("async_durable", durable)


def measure_size(
    label: str, target: int, rounds: int, contenders: Contenders, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every contender on a checkpoint of about ``target`` bytes: one warm-up round, then ``rounds``.

    The order rotates each round, so no contender always follows the same one (whose leftover
    writeback or cold cache it would otherwise always pay for).
    """
    model, optimizer = build_model(target)
    serialized = io.BytesIO()
    torch.save(checkpoint_dict(model, optimizer, 0), serialized)
    run = new_run(f"bench-{label}")
    case = Case(label, model, optimizer, serialized.getbuffer(), run)
    log(f"{label}: {len(case.serialized) / 2**20:.1f} MiB checkpoint, run {run.run_id}")
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
        end_run(run, contenders.reclaimer)
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
