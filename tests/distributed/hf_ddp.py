"""A Hugging Face Trainer under DDP (2 CPU ranks, gloo) with TrackingCallback, for torchrun:

    torchrun --standalone --nproc-per-node=2 -m tests.distributed.hf_ddp RUN_ID OUTPUT_DIR STATE_FILE
        [--resume KEY [--from RUN]] [--steps N] [--machine-per-rank] [--fail]

Trains 4 epochs of a tiny classifier and logs every epoch's checkpoint to RUN_ID (``--steps N``: a
checkpoint every N steps, the Trainer's ``save_strategy="steps"``, and the loss of every step);
``--resume KEY`` first materialises the checkpoint of that epoch (or step) of RUN (``--from``; else of
RUN_ID itself) on every rank (``checkpoint_folder``; each download is printed) and resumes from it,
logging on to RUN_ID. Rank 0 writes the final
weights, optimizer state and losses to STATE_FILE. ``--machine-per-rank`` makes each rank the first
of a machine of its own with its own disk: ``LOCAL_RANK`` 0, and an OUTPUT_DIR of its own
(``OUTPUT_DIR/rank-<rank>``).
``--fail`` makes rank 0's upload fail: every rank must raise, none may wait in a collective.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

import tracking
from pipelines import data
from pipelines.hf_model import DigitsClassifier, DigitsConfig, Examples
from tracking.integrations.transformers import TrackingCallback, checkpoint_folder, folders
from tracking.integrations.transformers import callback as hf_callback

EPOCHS = 4


def make_trainer(output_dir: Path, run_id: str, steps: int | None = None) -> Trainer:
    full = data.load("digits")
    # 128 rows in batches of 16 per rank: 4 steps an epoch on each of the 2 ranks.
    train, val = Examples(full.x_train[:128], full.y_train[:128]), Examples(full.x_val[:32], full.y_val[:32])
    torch.manual_seed(0)
    if steps is None:
        strategies: dict[str, Any] = {"save_strategy": "epoch", "eval_strategy": "epoch", "logging_strategy": "epoch"}
    else:
        strategies = {"save_strategy": "steps", "save_steps": steps, "eval_strategy": "steps", "eval_steps": steps}
        strategies |= {"logging_strategy": "steps", "logging_steps": 1}
    args = TrainingArguments(
        str(output_dir),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        **strategies,
        report_to="none",
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = DigitsClassifier(DigitsConfig(hidden=16))
    return Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[TrackingCallback(run_id=run_id)]
    )


def main(argv: list[str]) -> int:
    run_id, output_dir, state_file = argv[0], Path(argv[1]), Path(argv[2])
    resume = int(argv[argv.index("--resume") + 1]) if "--resume" in argv else None
    source = argv[argv.index("--from") + 1] if "--from" in argv else run_id
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else None
    if "--fail" in argv:

        def refuse(*args: object, **kwargs: object) -> object:
            raise tracking.StorageError("the store refused the upload (test)")

        hf_callback.commit_local_files = refuse  # type: ignore[assignment]
    if "--machine-per-rank" in argv:
        os.environ["LOCAL_RANK"] = "0"
        output_dir = output_dir / f"rank-{os.environ['RANK']}"
    download_files = folders.download_files

    def download(*args: Any, **kwargs: Any) -> Any:
        print(f"rank {os.environ['RANK']}: downloaded", flush=True)
        return download_files(*args, **kwargs)

    folders.download_files = download  # type: ignore[assignment]
    trainer = make_trainer(output_dir, run_id, steps)
    rank = trainer.args.process_index
    try:
        # After the Trainer is made: its process group lets one rank download for the others.
        folder = None if resume is None else checkpoint_folder(source, resume, output_dir=output_dir)
        trainer.train(resume_from_checkpoint=folder)
    except tracking.TrackingError as exc:
        print(f"rank {rank}: raised {type(exc).__name__}: {exc}", flush=True)
        return 3
    if rank == 0:
        final: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
        torch.save(final, state_file)
    print(f"rank {rank}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
