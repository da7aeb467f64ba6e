"""Lightning integration benchmark: what mirroring a checkpoint into MLflow adds on top of Lightning's own save.

    .venv/bin/tracking stack up --data-dir /tmp/lt-stack && source /tmp/lt-stack/stack.env
    python -m benchmarks.lightning [--saves 20] [--big-mb 500] [--output PATH]
    python -m benchmarks.lightning --smoke      # tiny sizes, any tracking store (the unit test's)

Two figures, each against a baseline measured in the same process, interleaved with it:

- **per-checkpoint overhead** for a seed-sized LightningModule: the median time of
  ``trainer.save_checkpoint`` with :class:`~tracking.integrations.lightning.MLflowCheckpoints`
  attached (a synchronous commit: logged model, ``checkpoint.pt``, manifest, READY, the run's tags)
  minus the median of the same call on a Trainer without it (Lightning's local save alone);
  target <= 60 ms.
- **training time added by a big checkpoint** with ``background=True``: the time
  ``trainer.save_checkpoint`` of a ~500 MB checkpoint blocks the loop beyond Lightning's own local save,
  as a fraction of the time the upload then takes in the background; target <= 0.1.

Results print as a table and are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_OVERHEAD_S = 0.060
TARGET_ADDED_RATIO = 0.1
DEFAULT_OUTPUT = Path("benchmarks/results/lightning.json")


def _module(n_params: int) -> Any:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class BenchModule(pl.LightningModule):
        def __init__(self, width: int = 64, depth: int = 2) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            # SGD without momentum keeps no state: the checkpoint is the weights' size.
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    width = 1024
    depth = max(1, round(n_params / (width * width + width)))
    if n_params < width * width:
        width, depth = 64, 2
    globals()["BenchModule"] = BenchModule
    BenchModule.__module__, BenchModule.__qualname__ = __name__, "BenchModule"
    return BenchModule(width=width, depth=depth), width


def _trainer(folder: Path, mirror: Any) -> Any:
    """A Trainer fitted one step (so it has its optimizer), ready for ``save_checkpoint``."""
    import lightning.pytorch as pl

    callbacks = [mirror] if mirror is not None else []
    return pl.Trainer(
        max_epochs=1,
        max_steps=1,
        default_root_dir=str(folder),
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _fit_once(trainer: Any, module: Any, width: int) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    trainer.fit(module, DataLoader(TensorDataset(torch.randn(2, width)), batch_size=2))


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _save(trainer: Any, folder: Path, index: int) -> Callable[[], None]:
    # Each save its own epoch (the integration commits one checkpoint per epoch and step).
    def save() -> None:
        trainer.fit_loop.epoch_progress.current.completed = index
        trainer.save_checkpoint(str(folder / f"epoch={index}.ckpt"))

    return save


def measure_overhead(saves: int, work: Path) -> dict[str, Any]:
    """Median save time of a seed-sized module with and without the mirror, interleaved."""
    import mlflow

    import tracking
    from tracking.integrations.lightning import MLflowCheckpoints

    module, width = _module(64 * 64 * 2)
    plain = _trainer(work / "plain", None)
    _fit_once(plain, module, width)
    # The core's own commit of the same module (tracking.log_checkpoint), for reference: the floor this
    # stack puts under any checkpoint's commit (its requests), whichever loop makes it.
    with mlflow.start_run(run_name="bench-lightning-core") as core_run:
        core_id = core_run.info.run_id
    optimizer = plain.optimizers[0]

    def core_save(index: int) -> Callable[[], Any]:
        return lambda: tracking.log_checkpoint(module, optimizer, epoch=index, run_id=core_id)

    with mlflow.start_run(run_name="bench-lightning-overhead") as run:
        mirrored = _trainer(work / "mirrored", MLflowCheckpoints(describe_run=True))
        other, _ = _module(64 * 64 * 2)
        _fit_once(mirrored, other, width)
        base, ours, core = [], [], []
        for index in range(saves + 1):  # the first of each is a warm-up
            base.append(_timed(_save(plain, work / "plain", index)))
            ours.append(_timed(_save(mirrored, work / "mirrored", index)))
            core.append(_timed(core_save(index)))
        base, ours, core = base[1:], ours[1:], core[1:]
    size = (work / "plain" / "epoch=1.ckpt").stat().st_size
    overhead = statistics.median(ours) - statistics.median(base)
    return {
        "run_id": run.info.run_id,
        "checkpoint_bytes": size,
        "saves": saves,
        "lightning_save_median_s": statistics.median(base),
        "mirrored_save_median_s": statistics.median(ours),
        "overhead_median_s": overhead,
        "core_log_checkpoint_median_s": statistics.median(core),
        "target_s": TARGET_OVERHEAD_S,
        "pass": overhead <= TARGET_OVERHEAD_S,
    }


def measure_background(big_mb: int, rounds: int, work: Path) -> dict[str, Any]:
    """A big checkpoint: the save's blocking time with background uploads vs Lightning's local save, and the upload."""
    import mlflow

    from tracking.integrations.lightning import MLflowCheckpoints

    module, width = _module(big_mb * 2**20 // 4)
    plain = _trainer(work / "big-plain", None)
    _fit_once(plain, module, width)
    other, _ = _module(big_mb * 2**20 // 4)
    mirror = MLflowCheckpoints(background=True)
    with mlflow.start_run(run_name="bench-lightning-background") as run:
        mirrored = _trainer(work / "big-mirrored", mirror)
        _fit_once(mirrored, other, width)
        base, blocked, upload = [], [], []
        size = 0
        assert mirror._io is not None
        flush = mirror._io.flush

        def plain_round(index: int) -> None:
            base.append(_timed(_save(plain, work / "big-plain", index)))
            (work / "big-plain" / f"epoch={index}.ckpt").unlink()

        def mirrored_round(index: int) -> None:
            nonlocal size
            blocked.append(_timed(_save(mirrored, work / "big-mirrored", index)))
            upload.append(_timed(flush))
            size = (work / "big-mirrored" / f"epoch={index}.ckpt").stat().st_size
            (work / "big-mirrored" / f"epoch={index}.ckpt").unlink()

        for index in range(rounds):
            # Alternating which goes first, so that neither always meets a cold or a warm page cache.
            for measure in (plain_round, mirrored_round) if index % 2 == 0 else (mirrored_round, plain_round):
                measure(index)
    added = statistics.median(blocked) - statistics.median(base)
    upload_s = statistics.median(upload)
    ratio = added / upload_s if upload_s > 0 else float("inf")
    return {
        "run_id": run.info.run_id,
        "checkpoint_mb": big_mb,
        "bytes": size,
        "rounds": rounds,
        "lightning_save_median_s": statistics.median(base),
        "mirrored_save_blocking_median_s": statistics.median(blocked),
        "added_to_loop_median_s": added,
        "background_upload_median_s": upload_s,
        "added_over_upload": ratio,
        "target_ratio": TARGET_ADDED_RATIO,
        "pass": ratio <= TARGET_ADDED_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lightning", description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=20, help="measured saves of the seed-sized module (default 20)")
    parser.add_argument("--big-mb", type=int, default=500, help="size of the big checkpoint in MiB (default 500)")
    parser.add_argument("--rounds", type=int, default=4, help="saves of the big checkpoint (default 4)")
    parser.add_argument("--smoke", action="store_true", help="3 saves, a 4 MiB 'big' checkpoint, 1 round")
    parser.add_argument("--experiment", default="bench-lightning", help="MLflow experiment (default bench-lightning)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.smoke:
        args.saves, args.big_mb, args.rounds = 3, 4, 1
    import logging

    import mlflow

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mlflow.set_experiment(args.experiment)
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as folder:
        work = Path(folder)
        overhead = measure_overhead(args.saves, work)
        background = measure_background(args.big_mb, args.rounds, work)
    results = {
        "tracking_uri": mlflow.get_tracking_uri(),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "overhead": overhead,
        "background": background,
    }
    print(
        f"per-checkpoint overhead ({overhead['checkpoint_bytes'] / 1024:.0f} KiB checkpoint, "
        f"{overhead['saves']} saves): Lightning's save {overhead['lightning_save_median_s'] * 1000:.1f} ms, "
        f"mirrored {overhead['mirrored_save_median_s'] * 1000:.1f} ms, overhead "
        f"{overhead['overhead_median_s'] * 1000:.1f} ms (target <= {TARGET_OVERHEAD_S * 1000:.0f} ms): "
        f"{'PASS' if overhead['pass'] else 'FAIL'}; the core's log_checkpoint of the same module "
        f"{overhead['core_log_checkpoint_median_s'] * 1000:.1f} ms"
    )
    print(
        f"{background['checkpoint_mb']} MiB checkpoint, background upload: Lightning's save "
        f"{background['lightning_save_median_s']:.2f} s, the mirrored save blocks "
        f"{background['mirrored_save_blocking_median_s']:.2f} s (+{background['added_to_loop_median_s']:.3f} s), "
        f"upload {background['background_upload_median_s']:.2f} s: added/upload "
        f"{background['added_over_upload']:.3f} (target <= {TARGET_ADDED_RATIO}): "
        f"{'PASS' if background['pass'] else 'FAIL'}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
