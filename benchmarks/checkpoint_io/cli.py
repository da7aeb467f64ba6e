"""The benchmark's command line: its arguments, and the order of the measurements."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tracking
from benchmarks.checkpoint_io.contenders import CONTENDERS, Contenders, measure_size
from benchmarks.checkpoint_io.probes import measure_fixed_cost, measure_memory, measure_resolution, probe_memory
from benchmarks.checkpoint_io.reader import measure_reader, moto_server
from benchmarks.checkpoint_io.report import METRICS, memory_flatness, print_reader, print_tables, write_results
from benchmarks.checkpoint_io.runs import end_run, new_run
from benchmarks.checkpoint_io.stack import Reclaimer, bench_stack, client_env

DESCRIPTION = "Checkpoint I/O benchmark: our S3 fast path against raw boto3, naive MLflow and the plain-HTTP floor."
DEFAULT_SIZES = "16MB,512MB,2GB"
QUICK_SIZES = "4MB,40MB"
DEFAULT_READER_SIZE = "256MB"
QUICK_READER_SIZE = "40MB"
DEFAULT_DATA_DIR = Path(".tracking/bench")
# Away from the defaults (8333, 5000) and below the integration tests' random range (20000+).
DEFAULT_S3_PORT = 18333
DEFAULT_MLFLOW_PORT = 18343
DEFAULT_OUTPUT = Path("benchmarks/results/checkpoint_io.json")
SEED_SAVES = 20
QUICK_SEED_SAVES = 5
MANY_CHECKPOINTS = 1000
QUICK_MANY_CHECKPOINTS = 50


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_io", description=DESCRIPTION)
    parser.add_argument("--sizes", default=None, help=f"checkpoint sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds after one warm-up (default 5)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}, 2 rounds, fewer saves")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--use-env", action="store_true", help="use the stack the MLFLOW_*/AWS_* variables describe")
    parser.add_argument("--master-url", default=None, help="with --use-env: SeaweedFS master URL, to vacuum")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"bench stack (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--reader-size",
        default=None,
        help=f"object read by ours and by one get_object, on moto and SeaweedFS (default {DEFAULT_READER_SIZE})",
    )
    parser.add_argument(
        "--reader-only", action="store_true", help="measure only the reader figure (ours vs one get_object)"
    )
    parser.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT)
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT)
    # The memory probes re-run this command in a child process with these (see probes.measure_memory).
    parser.add_argument("--probe-memory", choices=("ours", "boto3"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")]
    for size in args.sizes:
        parse_size(size)
    args.reader_size = args.reader_size or (QUICK_READER_SIZE if args.quick else DEFAULT_READER_SIZE)
    parse_size(args.reader_size)
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

    stack = bench_stack(
        use_env=args.use_env,
        master_url=args.master_url,
        data_dir=args.data_dir,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
    )
    with stack as endpoint, client_env(endpoint):
        log(
            f"stack: S3 {endpoint.s3_endpoint_url}, tracking {endpoint.tracking_uri}"
            f" ({'started here' if endpoint.started else 'reused'})"
        )
        # One default client both measures raw boto3 and deletes what every contender stored.
        client = endpoint.boto3_client()
        reclaimer = Reclaimer(client, endpoint.master_url)
        contenders = Contenders(endpoint, client, reclaimer)
        config = tracking.TrackingConfig.from_env()
        reader = measure_readers(parse_size(args.reader_size), args.rounds, reclaimer, log)
        if args.reader_only:
            print_reader(reader)
            return 0
        sizes, memory = [], []
        for label in args.sizes:
            target = parse_size(label)
            sizes.append(measure_size(label, target, args.rounds, contenders, log))
            memory.append(measure_memory(label, target, endpoint, reclaimer))
            reclaimer.maybe_vacuum(force=True)
            log(f"{label}: memory ours {memory[-1]['ours']['ratio']:.3f}, boto3 {memory[-1]['boto3']['ratio']:.3f}")
        fixed = measure_fixed_cost(QUICK_SEED_SAVES if args.quick else SEED_SAVES, reclaimer, log)
        resolution = measure_resolution(QUICK_MANY_CHECKPOINTS if args.quick else MANY_CHECKPOINTS, reclaimer, log)
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
        "reader": reader,
        "output": str(args.output),
    }
    write_results(results, args.output)
    print_tables(results)
    print_reader(reader)
    return 0


def measure_readers(size: int, rounds: int, reclaimer: Reclaimer, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The reader figure on moto's server (started here) and on the bench stack's SeaweedFS."""
    with moto_server() as env:
        on_moto = measure_reader("moto server", env, env["bucket"], "reader", size, rounds, log)
    run = new_run("bench-reader")
    try:
        on_seaweedfs = measure_reader("SeaweedFS", dict(os.environ), run.bucket, run.prefix, size, rounds, log)
    finally:
        end_run(run, reclaimer)
    return [on_moto, on_seaweedfs]
