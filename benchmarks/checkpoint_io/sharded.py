"""Sharded save under torchrun: every rank streams its shards vs rank 0 gathering the full state and saving it alone.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.checkpoint_io.sharded [--size 512MB] [--rounds 5]

Run with the stack's variables set (``. .tracking/bench/stack.env`` after ``make bench``, or any
``tracking stack up``). A model of Linear layers plus Adam state of about ``--size`` bytes in all is
sharded with FSDP2 over the ranks. Each round, interleaved, after one warm-up round:

- **sharded**: ``tracking.log_checkpoint`` of the FSDP2 model: each rank writes its own shard file
  (through DCP and the project's storage writer), rank 0 commits;
- **gathered**: every rank hands its shards to rank 0 (``get_state_dict(full_state_dict=True,
  cpu_offload=True)``), which saves the full state alone through the single-writer path
  (``checkpoint.pt`` streamed by the same S3 store).

Times are wall clock from a barrier to the moment every rank has returned; medians. Memory: the
peak RSS growth of each rank during a sharded save (sampled every 2 ms), against its shard's bytes.
Writes ``benchmarks/results/checkpoint_io_sharded.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import tracking
from benchmarks.checkpoint_io.cli import parse_size
from benchmarks.checkpoint_io.model import build_model
from benchmarks.checkpoint_io.probes import _rss
from tracking.checkpoint import snapshot_checkpoint
from tracking.commit import CheckpointSnapshot, commit_checkpoint
from tracking.parallel import distributed
from tracking.run import open_run

RESULTS = Path(__file__).resolve().parents[1] / "results" / "checkpoint_io_sharded.json"
RATIO_BOUND = 0.75
MEMORY_BOUND = 0.35


def main() -> None:
    parser = argparse.ArgumentParser(prog="torchrun ... -m benchmarks.checkpoint_io.sharded")
    parser.add_argument("--size", type=parse_size, default=parse_size("512MB"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        run(args.size, args.rounds)
    finally:
        dist.destroy_process_group()


def run(size: int, rounds: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, _ = build_model(size)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, model[0].in_features)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    shard_bytes = sum(_local_bytes(v) for v in get_model_state_dict(model).values()) + sum(
        _local_bytes(v) for s in get_optimizer_state_dict(model, optimizer)["state"].values() for v in s.values()
    )
    run_id = None
    if rank == 0:
        mlflow.set_experiment("bench-sharded")
        run_id = mlflow.start_run().info.run_id
    distributed.group()
    times: dict[str, list[float]] = {"sharded": [], "gathered": []}
    growth: list[int] = []
    epoch = 0
    for round_ in range(rounds + 1):
        for contender in ("sharded", "gathered"):
            epoch += 1
            gc.collect()
            dist.barrier()
            baseline, peak = _rss(), [0]
            stop = threading.Event()
            sampler = threading.Thread(target=_sample, args=(stop, peak), daemon=True)
            sampler.start()
            start = time.perf_counter()
            if contender == "sharded":
                tracking.log_checkpoint(model, optimizer, epoch=epoch, run_id=run_id)
            else:
                _gathered(model, optimizer, epoch, run_id)
            dist.barrier()
            took = time.perf_counter() - start
            stop.set()
            sampler.join()
            if round_ == 0:
                continue  # warm-up: imports, clients, connection pools
            times[contender].append(took)
            if contender == "sharded":
                growth.append(max(peak[0], _rss()) - baseline)
            if rank == 0:
                print(f"round {round_} {contender}: {took:.2f} s", flush=True)
    growths = distributed.gather((growth, shard_bytes))
    if rank == 0:
        assert growths is not None
        sharded, gathered = statistics.median(times["sharded"]), statistics.median(times["gathered"])
        per_rank = [
            {"rank": r, "shard_bytes": b, "peak_growth_bytes": max(g), "ratio": max(g) / b}
            for r, (g, b) in enumerate(growths)
        ]
        result = {
            "world_size": world,
            "checkpoint_bytes": sum(b for _, b in growths),
            "rounds": rounds,
            "sharded_seconds": times["sharded"],
            "gathered_seconds": times["gathered"],
            "sharded_median": sharded,
            "gathered_median": gathered,
            "ratio": sharded / gathered,
            "ratio_bound": RATIO_BOUND,
            "memory": per_rank,
            "memory_bound": MEMORY_BOUND,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2))
        print(
            f"{world} ranks, {result['checkpoint_bytes'] / 2**20:.0f} MiB: sharded {sharded:.2f} s, "
            f"gathered to rank 0 {gathered:.2f} s, ratio {sharded / gathered:.2f} (target <= {RATIO_BOUND}); "
            + ", ".join(f"rank {m['rank']} peak extra {m['ratio']:.3f}x its shard" for m in per_rank)
            + f" (target <= {MEMORY_BOUND})",
            flush=True,
        )
        mlflow.end_run()


def _gathered(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, run_id: str | None) -> None:
    """Rank 0 gathers the full state (every rank takes part) and saves it alone, as one checkpoint.pt."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return
    assert run_id is not None
    described = snapshot_checkpoint(torch.nn.Linear(1, 1), None, epoch=epoch)
    payload = {"epoch": epoch, "model_state": model_state, "optim_state": optim_state, "step": None, "metrics": {}}
    commit_checkpoint(open_run(run_id, reuse=True), CheckpointSnapshot(payload, described.manifest, None, "min"))


def _sample(stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.002):
        peak[0] = max(peak[0], _rss())


def _local_bytes(value: Any) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    local = value.to_local() if hasattr(value, "to_local") else value
    return int(local.numel() * local.element_size())


if __name__ == "__main__":
    main()
