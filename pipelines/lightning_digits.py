"""Train a small LightningModule on scikit-learn's 8x8 digits with a Lightning Trainer; every checkpoint
ModelCheckpoint writes is a logged model of the run (tracking.integrations.lightning).

python -m pipelines.lightning_digits --epochs 10
python -m pipelines.lightning_digits --resume RUN_ID --epochs 20
python -m pipelines.lightning_digits --epochs 10 --checkpoint-every-steps 20   # checkpoint-step-00000020, ...

The checkpoints are saved every --checkpoint-every N epochs, or (recorded, instead) every
--checkpoint-every-steps N optimizer steps, keyed by global step; either way also at the end of the
last epoch, so a run's latest checkpoint is where it stopped. A save by steps that falls on an epoch's
last batch is made at that epoch's end, after its validation, as saves by epoch are (Lightning resumes
a save made before that validation past it, not as a run that never stopped). --keep-best ranks
the saves by steps by the latest validation's --monitor.

--resume RUN_ID goes on in RUN_ID from its latest checkpoint (a resume keeps the run's kind of key),
bit for bit as a longer run would have: the training loader is resumable (an order drawn from --seed
and the epoch, and its place in the epoch kept in each checkpoint), so a save in mid-epoch, the latest
of a run killed before its end, resumes at its next batch. --override applies the options given from
there on, the learning rate into the restored optimizer and scheduler (the module's hparams and the
run's params keep the run's), and --seed to the dropout too (the checkpoint's RNG states are not restored),
and records them in the run's override tags, which its later resumes go on with. A resume without --epochs
goes on to the run's target (tag tracking.epochs), one with --epochs sets it.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines import options
from pipelines.steps import Position

NAME = "pipelines.lightning_digits"
DATASET = "digits"
HIDDEN, DROPOUT = 128, 0.2
PARAMS = {"model": "LitDigits", "hidden": HIDDEN, "dropout": DROPOUT, "optimizer": "Adam"}


def main(argv: Sequence[str] | None = None) -> int:
    opts = options.parse(
        argv, prog=f"python -m {NAME}", description=__doc__, defaults={"epochs": 10, "lr": 1e-3}, steps=True
    )
    if opts.from_epoch is not None or opts.from_step is not None or opts.new_run or opts.strategy is not None:
        print(
            f"{NAME}: --from-epoch, --from-step, --new-run and --strategy are the other pipelines'; this pipeline "
            "resumes RUN_ID itself from its latest checkpoint (Lightning's own DDP: see README).",
            file=sys.stderr,
        )
        return 2
    return options.run_pipeline(lambda: train(opts))


def train(opts: options.Options) -> str:
    """Train a new run, or go on with ``--resume RUN_ID``; returns the run ID."""
    import lightning.pytorch as pl
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    import tracking
    from pipelines import noise, override, reporting, resume, runs
    from pipelines.lightning_modules import (
        GivenLearningRate,
        LitDigits,
        PipelineCheckpoint,
        RebatchedEpoch,
        digits_loaders,
    )
    from tracking.integrations.lightning import MLflowCheckpoints, checkpoint_path

    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    opts = resume.pinned(opts, config)
    origin = runs.find_run(client, opts.resume, config) if opts.resume else None
    recorded = origin.data.params if origin else {}
    if origin is not None:
        resume.check_pipeline(origin, NAME, DATASET)
    if origin is not None and (opts.from_step is not None or opts.from_epoch is not None):
        _refuse_a_pick_but_the_latest(origin.info.run_id, opts, config)
    if origin is not None:
        resume.check_pick(origin.info.run_id, opts, config)
        resume.check_trainer(origin, opts)
    opts = resume.with_target(opts, origin)
    current = override.current_params(origin)
    values = opts.settings(current, origin.info.run_id if origin else None)
    conflicts: dict[str, tuple[str, str]] = {}
    ckpt_path = None
    position = None
    tags = runs.resume_tags(None, opts, {}, 0)  # a new run's: its target
    if origin is not None:
        conflicts = opts.conflicts(current)
        runs.refuse_changes(origin.info.run_id, conflicts, opts.override)
        resume.check_keys(origin.info.run_id, values, config, instead="train a new run (no --resume)")
        ckpt_path = checkpoint_path(origin.info.run_id)
        epoch, step, taken = _resumed_at(ckpt_path)
        # Refused before the run is touched: inside it, the refusal would end the run FAILED.
        resume.check_target(origin, epoch, opts)
        # A save in mid-epoch goes on with the samples it had left: refused with another seed (another order), and
        # with a batch size they are no whole number of batches of.
        position = resume.resumed_position(taken, values, conflicts, origin.info.run_id, (epoch, step))
        by_step = values["checkpoint_every_steps"] is not None
        tags = runs.resume_tags(origin, opts, conflicts, epoch, step if by_step else None)
    pl.seed_everything(values["seed"], verbose=False)
    train_loader, val_loader = digits_loaders(values["batch_size"], values["seed"])
    # The module's hparams are the run's params (MLFlowLogger logs them, and a param cannot change): an
    # --override-n learning rate goes into the restored optimizer instead, and into the run's overrides tag.
    lr = options.RECORDED["lr"](recorded["lr"]) if "lr" in recorded else values["lr"]
    module = LitDigits(hidden=HIDDEN, dropout=DROPOUT, lr=lr)  # the digits' 64 pixels: its default
    run_args: dict[str, Any] = (
        {"run_id": origin.info.run_id}
        if origin
        else {"experiment_id": mlflow.set_experiment(config.experiment_name).experiment_id}
    )
    # The frameworks' adverts and warnings about their own code would bury the run's lines.
    with (
        runs.start_run(**run_args) as run,
        runs.killed_on_ctrl_c(run, f"python -m {NAME}", opts.epochs),
        noise.lightning_quiet(),
    ):
        if origin is None:
            mlflow.log_params(
                {
                    "pipeline": NAME,
                    "dataset": DATASET,
                    **{k: str(v) for k, v in PARAMS.items()},
                    **opts.params(values),
                }
            )
        mlflow.set_tags(tags)
        reporting.announce(client, run)
        runs.check_store(run.info.run_id, config)
        run_id = run.info.run_id
        # The run's own folder: a resume on this machine finds the files its ModelCheckpoint kept.
        folder = Path(tempfile.gettempdir()) / "tracking-lightning-digits" / run_id
        # Every N optimizer steps (the run's checkpoints keyed by global step) or every N epochs, and the last.
        steps = values["checkpoint_every_steps"]
        every = {"every_n_train_steps": steps} if steps is not None else {"every_n_epochs": values["checkpoint_every"]}
        # --keep-best all keeps every checkpoint, as --keep-last all does.
        keep_last = values["keep_last"] if values["keep_best"] is not None else None
        callbacks: list[Any] = [
            # The last N checkpoints (by global step), as --keep-last says; all with --keep-last all.
            PipelineCheckpoint(
                dirpath=folder / "last",
                filename="{epoch}-{step}",
                save_top_k=-1 if keep_last is None else keep_last,
                monitor="step",
                mode="max",
                **every,
            ),
        ]
        if keep_last is not None and values["keep_best"] is not None:
            callbacks.append(
                PipelineCheckpoint(
                    dirpath=folder / "best",
                    filename="{epoch}-{step}",
                    save_top_k=values["keep_best"],
                    monitor=values["monitor"],
                    mode=values["monitor_mode"],
                    **every,
                )
            )
        resume_command = f"python -m {NAME} --resume {{run_id}} --epochs {2 * opts.epochs}"
        if origin is not None:
            # Lightning restores the checkpoint's learning rate with the optimizer and the scheduler: the run's
            # may be another since (an --override now, or one whose resume stopped before its first save).
            callbacks.append(GivenLearningRate(values["lr"]))
        if position is not None:
            callbacks.append(RebatchedEpoch(position.batches))
        callbacks.append(
            MLflowCheckpoints(
                monitor=values["monitor"],
                mode=values["monitor_mode"],
                commands=[resume_command],
                # An --override-n seed draws (dropout too) from the seed set above, not the checkpoint's states.
                restore_rng="seed" not in conflicts,
            )
        )
        trainer = pl.Trainer(
            max_epochs=opts.epochs,
            callbacks=callbacks,
            logger=MLFlowLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri()),
            accelerator="cpu",
            devices=1,
            deterministic=True,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(folder),
        )
        _fit(trainer, module, train_loader, val_loader, ckpt_path)
        reporting.report(client, run, lightning_epochs=True)
        return str(run_id)


def _refuse_a_pick_but_the_latest(run_id: str, opts: options.Options, config: Any) -> None:
    """Refuse a ``--resume models:/...`` naming a checkpoint of run ``run_id`` other than its latest: Lightning
    resumes a run from where it stopped (:func:`pipelines.resume.pinned` made the URI
    ``--from-epoch``/``--from-step``)."""
    import tracking
    from pipelines import runs
    from tracking import layout

    picked = opts.from_step if opts.from_step is not None else opts.from_epoch
    latest = tracking.find_checkpoint(run_id, config=config).manifest
    if picked != latest.key:
        kind = layout.STEP if opts.from_step is not None else layout.EPOCH
        raise runs.PipelineError(
            f"--resume names the checkpoint of run {run_id} at {layout.label(kind, picked)}, not its latest "
            f"({layout.label(latest.keyed_by, latest.key)}): {NAME} resumes a run from its latest checkpoint; "
            f"pass --resume {run_id} to go on from there."
        )


def _resumed_at(ckpt_path: str) -> tuple[int, int, Position | None]:
    """Where a Lightning checkpoint resumes: the epochs it trained, as the user counts them (and the own-loop
    pipelines' tags), not Lightning's ``epoch`` from 0 (a save by steps in mid-epoch has not finished that
    epoch); its global step; and for a save in mid-epoch, the batches the epoch had taken (None at its end)."""
    import torch

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches = fit_loop.get("epoch_loop.batch_progress", {})
    mid_epoch = not batches.get("is_last_batch", True)
    epochs = int(checkpoint["epoch"]) + (0 if mid_epoch else 1)
    # The loader's samples taken (lightning_modules.ResumableLoader), in whole batches: the epoch's last, maybe
    # short, is saved at its end.
    loaders = fit_loop.get("state_dict", {}).get("combined_loader") or [{}]
    taken, ready = int(loaders[0].get("taken", 0)), int(batches.get("current", {}).get("ready", 0))
    position = Position(ready, batch_size=taken // ready) if mid_epoch and ready and taken else None
    return epochs, int(checkpoint["global_step"]), position


def _fit(trainer: Any, module: Any, train_loader: Any, val_loader: Any, ckpt_path: str | None) -> None:
    """``trainer.fit``, a Ctrl-C in it raised as KeyboardInterrupt (which ends the run KILLED): Lightning handles
    it itself, ignores SIGINT from then on and exits with status 1 (SystemExit, raised while handling it)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    except SystemExit as exited:
        if trainer.interrupted and isinstance(exited.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)  # a second Ctrl-C stops the process again


if __name__ == "__main__":
    sys.exit(main())
