"""GPU figures: how long an async save blocks the training loop, and how fast a load lands on the GPU.

    python -m benchmarks.checkpoint_io.gpu [--save-size 2GB] [--load-size 1GB] [--rounds 3]

Skipped, with the reason, where CUDA is absent (``make bench`` runs it after the CPU figures).
With ``MLFLOW_TRACKING_URI`` and ``MLFLOW_S3_ENDPOINT_URL`` set it uses that stack; otherwise it
starts moto's S3 server and a sqlite tracking store of its own (a GPU machine needs nothing else).
Every figure is a ratio against a baseline measured in the same run, on the same server:

- **async save, blocking time**: the time ``Checkpointer(async_save=True).save`` keeps the loop
  (fp32 Linear layers + SGD momentum on the GPU) against the physical floor, one copy of the same
  tensors into pinned host buffers allocated beforehand. The first save is measured twice: from a
  cold process (``log_checkpoint(blocking=False)``, nothing reserved) and after a call that saved
  nothing (the Checkpointer reserves its pinned memory then); then the following saves. Also
  ``torch.distributed.checkpoint.async_save`` of the same state (a 1-process gloo group).
- **load onto the GPU**: ``tracking.load(run, map_location="cuda")`` against one ``get_object`` +
  ``torch.load(map_location="cuda")`` from the same server, and, with the store on local disk
  (a ``file://`` artifact location), against ``torch.load`` of the local file.

Writes ``benchmarks/results/checkpoint_io_gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from torch import nn

from benchmarks.checkpoint_io.cli import parse_size

OUTPUT = Path("benchmarks/results/checkpoint_io_gpu.json")
LAYERS = 8
BUCKET = "bench-gpu"
# The GPU; the CPU only in a --smoke run, which checks that the steps run (its figures mean nothing).
DEVICE = torch.device("cuda")


def sgd_model(target_bytes: int) -> tuple[nn.Sequential, torch.optim.SGD]:
    """fp32 Linear layers on the GPU + SGD momentum, about ``target_bytes`` in all, after one step."""
    width = max(8, math.isqrt(target_bytes // (8 * LAYERS)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)]).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(2, width, device=DEVICE)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync()
    return model, optimizer


def cuda_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.state_dict().values())
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.device.type == DEVICE.type)
    return tensors


def timed(action: Callable[[], Any]) -> float:
    _sync()
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def floor_copy(tensors: list[torch.Tensor], rounds: int) -> float:
    """Median seconds of one copy of ``tensors`` into pinned buffers allocated (and touched) beforehand."""
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=DEVICE.type == "cuda") for t in tensors]

    def copy() -> None:
        for host, tensor in zip(buffers, tensors, strict=True):
            host.copy_(tensor, non_blocking=True)
        _sync()

    copy()  # first touch of the pages
    return statistics.median(timed(copy) for _ in range(rounds))


def async_saves(size: int, rounds: int) -> dict[str, Any]:
    import mlflow

    import tracking

    model, optimizer = sgd_model(size)
    nbytes = sum(t.numel() * t.element_size() for t in cuda_tensors(model, optimizer))
    # Cold: nothing pinned yet in this process, nothing reserved.
    with mlflow.start_run():
        cold = timed(lambda: tracking.log_checkpoint(model, optimizer, epoch=1, blocking=False))
        tracking.wait_for_checkpoints()
    _empty_host_cache()
    with mlflow.start_run(), tracking.Checkpointer(every_n_epochs=2, async_save=True) as checkpoints:
        later = []
        for epoch in range(1, 2 * rounds + 3):
            took = timed(lambda e=epoch: checkpoints.save(model, optimizer, epoch=e))  # type: ignore[misc]
            if epoch % 2:
                _join_reserves()  # training goes on meanwhile: an epoch is longer than the reserve
            else:
                later.append(took)
                checkpoints.wait()
    floor = floor_copy(cuda_tensors(model, optimizer), rounds)
    dcp = dcp_async_save(model, optimizer, rounds)
    return {
        "bytes": nbytes,
        "floor_s": floor,
        "floor_gb_per_s": nbytes / floor / 1e9,
        "cold_first_s": cold,
        "reserved_first_s": later[0],
        "later_s": statistics.median(later[1:]),
        "dcp_async_save_s": dcp,
        "ratios": {
            "cold_first/floor": cold / floor,
            "reserved_first/floor": later[0] / floor,
            "later/floor": statistics.median(later[1:]) / floor,
            "later/dcp_async_save": statistics.median(later[1:]) / dcp if dcp else None,
        },
    }


def dcp_async_save(model: nn.Module, optimizer: torch.optim.Optimizer, rounds: int) -> float | None:
    """Median blocking seconds of ``torch.distributed.checkpoint.async_save`` (after a warm-up), or None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import async_save  # type: ignore[attr-defined]

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        times = []
        with tempfile.TemporaryDirectory() as folder:
            for i in range(rounds + 1):
                began = time.perf_counter()
                future = async_save(state, checkpoint_id=f"{folder}/{i}")
                times.append(time.perf_counter() - began)
                future.result()  # type: ignore[union-attr]
        return statistics.median(times[1:])
    except Exception as exc:  # a torch without async_save, or one that refuses this setup
        print(f"dcp.async_save: not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    finally:
        dist.destroy_process_group()


def loads(size: int, rounds: int, endpoint_url: str) -> dict[str, Any]:
    import boto3
    import mlflow

    import tracking
    from benchmarks.checkpoint_io.model import build_model, new_adam
    from tracking import layout

    model, optimizer = build_model(size)
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for store, location in (("s3", f"s3://{BUCKET}/gpu"), ("local", Path(folder, "artifacts").as_uri())):
            experiment = mlflow.create_experiment(f"bench-gpu-{store}-{time.time_ns()}", artifact_location=location)
            with mlflow.start_run(experiment_id=experiment) as run:
                logged = tracking.log_checkpoint(model, optimizer, epoch=1)
            located = tracking.find_checkpoint(run.info.run_id)
            where = located.store.describe(located.path(layout.CHECKPOINT_FILE))
            ours = [
                timed(lambda: _cuda_load(run.info.run_id, model_factory=lambda: model, optimizer=new_adam))
                for _ in range(rounds + 1)
            ][1:]
            baseline = [timed(partial(_baseline_load, s3, where)) for _ in range(rounds + 1)][1:]
            figures[store] = {
                "model_id": logged.model_id,
                "ours_s": statistics.median(ours),
                "baseline_s": statistics.median(baseline),
                "ratio": statistics.median(ours) / statistics.median(baseline),
            }
    return {"bytes": size, **figures}


def _cuda_load(run_id: str, model_factory: Callable[[], nn.Module], optimizer: Any) -> None:
    import tracking

    loaded = tracking.load(run_id, map_location=DEVICE, model=lambda: model_factory().to(DEVICE), optimizer=optimizer)
    del loaded
    _sync()


def _baseline_load(s3: Any, where: str) -> None:
    """One streamed ``get_object`` + ``torch.load`` onto the GPU, or ``torch.load`` of the local file."""
    if where.startswith("s3://"):
        bucket, key = where.removeprefix("s3://").split("/", 1)
        source: Any = io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    else:
        source = url2pathname(urlsplit(where).path)
    torch.load(source, map_location=DEVICE, weights_only=True)
    _sync()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _empty_host_cache() -> None:
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _join_reserves() -> None:
    for thread in threading.enumerate():
        if thread.name == "tracking-pinned-reserve":
            thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def own_stack() -> Iterator[str]:
    """The stack the environment names, or moto's S3 server and a sqlite store of our own; the S3 endpoint."""
    import boto3
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI") and os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        endpoint = os.environ["MLFLOW_S3_ENDPOINT_URL"]
        with contextlib.suppress(Exception):
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        os.environ.update(
            MLFLOW_S3_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
        )
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        experiment = mlflow.create_experiment("bench-gpu", artifact_location=f"s3://{BUCKET}/saves")
        mlflow.set_experiment(experiment_id=experiment)
        try:
            yield endpoint
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_io.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--save-size", default="2GB", help="async save: weights + momentum (default 2GB)")
    parser.add_argument("--load-size", default="1GB", help="load onto the GPU: weights + Adam (default 1GB)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (default 3)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the steps run, for tests")
    args = parser.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = torch.device("cpu")
        args.save_size = args.load_size = "1MB"
    elif not torch.cuda.is_available():
        print(f"GPU benchmark skipped: no CUDA device here (torch {torch.__version__}).")
        return 0
    with own_stack() as endpoint:
        results: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "none (--smoke, on the CPU)",
            "torch": torch.__version__,
            "save": async_saves(parse_size(args.save_size), args.rounds),
            "load": loads(parse_size(args.load_size), args.rounds, endpoint),
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    save, load = results["save"], results["load"]
    print(f"GPU: {results['gpu']}, torch {results['torch']}")
    print(f"async save of {save['bytes'] / 2**30:.2f} GiB, blocking time (floor {save['floor_s'] * 1e3:.1f} ms, "
          f"{save['floor_gb_per_s']:.1f} GB/s):")  # fmt: skip
    for name, value in save["ratios"].items():
        print(f"  {name:24s} {'n/a' if value is None else f'{value:.2f}x'}")
    print(f"load of {load['bytes'] / 2**30:.2f} GiB onto the GPU:")
    print(f"  s3: ours {load['s3']['ours_s']:.2f} s vs get_object + torch.load {load['s3']['baseline_s']:.2f} s: "
          f"{load['s3']['ratio']:.2f}x")  # fmt: skip
    local = load["local"]
    print(f"  local: ours {local['ours_s']:.2f} s vs torch.load of the file {local['baseline_s']:.2f} s: "
          f"{local['ratio']:.2f}x")  # fmt: skip
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
