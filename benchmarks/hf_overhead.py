"""What TrackingCallback adds to a Hugging Face Trainer's checkpoints, against the Trainer's own local save.

    python -m benchmarks.hf_overhead                 # the stack the MLFLOW_*/AWS_* variables name, else its own
    python -m benchmarks.hf_overhead --smoke         # tiny sizes: checks every figure is produced (the unit test)

Two measurements, each against a baseline taken in the same process:

- **seed-sized folder** (a tiny ``PreTrainedModel``: config, safetensors, optimizer, scheduler, RNG and trainer
  state, several files): per checkpoint, the time ``on_save`` holds the training loop (files linked into the
  staging folder, the upload handed to the background), and the whole commit when it is synchronous
  (``async_upload=False``: every file, the manifest, READY, the run's tags), beside the Trainer's own save.
- **large folder** (about ``--large-size``, weights + AdamW's two moments): the training loop's time with the
  callback minus without it, per checkpoint, over the background upload's time per checkpoint (target <= 0.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTPUT = Path("benchmarks/results/hf_overhead.json")
EXPERIMENT = "bench-hf-overhead"


def _timed_trainer(saves: list[float]) -> type:
    from transformers import Trainer

    class TimedTrainer(Trainer):  # type: ignore[misc]
        """The Trainer, timing its own checkpoint save (the folder it writes, its rotation)."""

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            start = time.perf_counter()
            super()._save_checkpoint(model, trial)
            saves.append(time.perf_counter() - start)

    return TimedTrainer


def _train(
    hidden: int, epochs: int, steps: int, callbacks: list[Any], out: Path, saves: list[float]
) -> tuple[float, Any]:
    """Train ``epochs`` epochs of ``steps`` steps with a save each; the loop's seconds (begin to end, before
    any flush at the end) and the trainer."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from pipelines.hf_model import DigitsClassifier, DigitsConfig, Examples

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):  # type: ignore[misc]
        # First in the list: its on_train_end runs before TrackingCallback's flush.
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            marks["begin"] = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            marks["end"] = time.perf_counter()

    torch.manual_seed(0)
    model = DigitsClassifier(DigitsConfig(n_features=hidden, hidden=hidden, n_classes=10, dropout=0.0))
    rows = steps * 16
    data = Examples(torch.randn(rows, hidden), torch.randint(0, 10, (rows,)))
    args = TrainingArguments(
        str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        log_level="error",
    )
    trainer = _timed_trainer(saves)(model=model, args=args, train_dataset=data, callbacks=[Clock(), *callbacks])
    trainer.train()
    return marks["end"] - marks["begin"], trainer


def _folder_bytes(out: Path) -> int:
    folders = sorted(out.glob("checkpoint-*"))
    return sum(f.stat().st_size for f in folders[-1].iterdir()) if folders else 0


class _Commits:
    """Times every commit TrackingCallback makes (wrapping the commit it calls)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __enter__(self) -> _Commits:
        from tracking.integrations.transformers import callback as hf_callback

        self._original: Callable[..., Any] = hf_callback.commit_local_files  # type: ignore[attr-defined]

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = self._original(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            return result

        hf_callback.commit_local_files = timed  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        from tracking.integrations.transformers import callback as hf_callback

        hf_callback.commit_local_files = self._original  # type: ignore[attr-defined]


class _Blocking:
    """Times each ``on_save`` of a TrackingCallback: what the training loop waits for."""

    def __init__(self, callback: Any) -> None:
        self.seconds: list[float] = []
        original = callback.on_save

        def on_save(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            return result

        callback.on_save = on_save


def seed_sized(saves: int, work: Path) -> dict[str, Any]:
    """Per-checkpoint figures for a seed-sized folder: the Trainer's save, on_save's hold (async), a sync commit."""
    import mlflow
    from transformers import TrainerCallback

    from tracking.integrations.transformers import TrackingCallback

    results: dict[str, Any] = {}
    for mode in ("async", "sync"):
        hf_saves: list[float] = []
        callback = TrackingCallback(async_upload=mode == "async")
        blocking = _Blocking(callback)

        class Settle(TrainerCallback):  # type: ignore[misc]
            # Epochs of two steps come faster than any upload: a real epoch lets the previous upload finish
            # before the next save, so this one does too (outside the time measured), before on_save.
            def on_save(self, *args: Any, callback: Any = callback, **kwargs: Any) -> None:
                callback.wait()

        with mlflow.start_run(), _Commits() as commits:
            _train(32, saves + 1, 2, [Settle(), callback], work / f"seed-{mode}", hf_saves)
        # The first save pays for one-off set-up (connections, the run's first tags): left out.
        results[mode] = {
            "on_save_ms": 1e3 * statistics.median(blocking.seconds[1:]),
            "commit_ms": 1e3 * statistics.median(commits.seconds[1:]),
            "hf_save_ms": 1e3 * statistics.median(hf_saves[1:]),
        }
    results["bytes"] = _folder_bytes(work / "seed-sync")
    results["files"] = len(list(sorted((work / "seed-sync").glob("checkpoint-*"))[-1].iterdir()))
    return results


def large(size: int, steps: int, epochs: int, rounds: int, work: Path) -> dict[str, Any]:
    """The loop's time added per checkpoint by background uploads of a ``size``-byte folder, over the upload time.

    Runs with and without the callback alternate, ``rounds`` of each; the fastest of each counts (other work
    on the machine only ever slows a run down).
    """
    import math
    import shutil

    import mlflow

    from tracking.integrations.transformers import TrackingCallback

    # Weights (about hidden^2 fp32 numbers) plus AdamW's two moments: 3 x 4 bytes x hidden^2.
    hidden = max(16, int(math.sqrt(size / 12)))
    baselines: list[float] = []
    loops: list[float] = []
    uploads: list[float] = []
    holds: list[float] = []
    saves: list[float] = []
    folder_bytes = 0
    for index in range(rounds):
        baseline, _ = _train(hidden, epochs, steps, [], work / f"large-baseline-{index}", saves)
        baselines.append(baseline)
        folder_bytes = _folder_bytes(work / f"large-baseline-{index}")
        shutil.rmtree(work / f"large-baseline-{index}")
        callback = TrackingCallback()
        blocking = _Blocking(callback)
        with mlflow.start_run(), _Commits() as commits:
            loop, _ = _train(hidden, epochs, steps, [callback], work / f"large-tracked-{index}", saves)
        shutil.rmtree(work / f"large-tracked-{index}")
        loops.append(loop)
        uploads += commits.seconds
        holds += blocking.seconds
    upload = statistics.median(uploads)
    added = (min(loops) - min(baselines)) / epochs
    return {
        "bytes": folder_bytes,
        "checkpoints": epochs,
        "rounds": rounds,
        "baseline_loop_s": min(baselines),
        "tracked_loop_s": min(loops),
        "hf_save_s": statistics.median(saves),
        "upload_s": upload,
        "on_save_s": statistics.median(holds),
        "added_per_checkpoint_s": added,
        "added/upload": added / upload,
        "on_save/upload": statistics.median(holds) / upload,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=10, help="seed-sized checkpoints measured (default 10)")
    parser.add_argument("--large-size", default="500MB", help="the large folder's size (default 500MB)")
    parser.add_argument("--large-steps", type=int, default=40, help="training steps per epoch, large model")
    parser.add_argument("--large-epochs", type=int, default=3, help="checkpoints of the large model (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="large runs with and without the callback (default 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for training (default: torch's, every core)"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every figure is produced")
    args = parser.parse_args(argv)
    if args.smoke:
        args.saves, args.large_size, args.large_steps, args.large_epochs, args.rounds = 2, "4MB", 2, 2, 1
    import tempfile

    import mlflow

    from benchmarks.checkpoint_io.cli import parse_size
    from benchmarks.checkpoint_io.gpu import own_stack

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if args.threads is not None:
        import torch

        # Training on fewer cores than the machine has: as on a GPU, where the CPU has cores to spare.
        torch.set_num_threads(args.threads)
    from_env = bool(os.environ.get("MLFLOW_TRACKING_URI") and os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    with own_stack(), tempfile.TemporaryDirectory() as folder:
        if from_env:
            mlflow.set_experiment(EXPERIMENT)
        work = Path(folder)
        results: dict[str, Any] = {
            "seed": seed_sized(args.saves, work),
            "large": large(parse_size(args.large_size), args.large_steps, args.large_epochs, args.rounds, work),
            "stack": os.environ.get("MLFLOW_TRACKING_URI", ""),
            "threads": args.threads,
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    seed, big = results["seed"], results["large"]
    print(f"seed-sized folder ({seed['files']} files, {seed['bytes'] / 1024:.0f} KiB), per checkpoint (median):")
    print(f"  Trainer's own save            {seed['async']['hf_save_ms']:8.1f} ms")
    print(f"  on_save, background upload    {seed['async']['on_save_ms']:8.1f} ms  (the loop's wait)")
    print(f"  upload in the background      {seed['async']['commit_ms']:8.1f} ms")
    print(f"  on_save, async_upload=False   {seed['sync']['on_save_ms']:8.1f} ms  (the whole commit in the loop)")
    print(f"large folder ({big['bytes'] / 2**20:.0f} MiB), {big['checkpoints']} checkpoints, best of {big['rounds']}:")
    print(f"  upload (background)           {big['upload_s']:8.2f} s per checkpoint")
    print(f"  Trainer's own save            {big['hf_save_s']:8.2f} s per checkpoint")
    print(f"  loop time added               {big['added_per_checkpoint_s']:8.2f} s per checkpoint "
          f"({big['added/upload']:.3f}x the upload)")  # fmt: skip
    print(f"  on_save                       {big['on_save_s']:8.3f} s per checkpoint "
          f"({big['on_save/upload']:.4f}x the upload)")  # fmt: skip
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
