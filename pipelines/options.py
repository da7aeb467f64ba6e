"""The command line every training pipeline shares, how a resumed run's params fill it in, and how it runs."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.trainer import RunInUseError
from tracking.config import bound_mlflow_requests
from tracking.errors import TrackingError, print_error, run_command

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")

DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "lr": 0.01,
    "batch_size": 32,
    "seed": 0,
    "checkpoint_every": 1,
    "checkpoint_every_steps": None,  # None: by epoch (--checkpoint-every)
    "keep_last": 3,
    "keep_best": 1,
    "monitor": "val_loss",
    "monitor_mode": None,  # None: max for accuracies, min otherwise
}


# How a param spells None: keep every checkpoint ("all"), or no saving by that interval ("none").
ALL, NONE = "all", "none"
# The options a run saves by: every N epochs, or every N optimizer steps.
INTERVALS = ("checkpoint_every", "checkpoint_every_steps")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int | None:
    # --keep-last 0 was refused as "expected a positive integer", which did not say how to keep every checkpoint.
    if text == ALL:
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, or {ALL} to keep every checkpoint (delete none), got {text!r}"
        ) from None


def _interval(text: str) -> int | None:
    # A run saves by epoch or by step: the other interval is recorded as "none".
    return None if text == NONE else _positive_int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    # inf (or 1e400) trained a run to NaN weights, and the loss refused them with a traceback mid-epoch.
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


# What numpy, and Lightning's and transformers' seed_everything, accept: any other seed failed with a
# traceback (Lightning's, a ValueError of its own) after the command line was taken.
SEEDS = range(2**32)


def _seed(text: str) -> int:
    refused = argparse.ArgumentTypeError(f"expected a whole number from 0 to {SEEDS[-1]}, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise refused from None
    if value not in SEEDS:
        raise refused
    return value


def _named(what: str) -> Callable[[str], str]:
    """The type of an option that names something (a run, an experiment): refused when blank. An empty
    ``--resume "$RUN_ID"`` (the variable unset) started a new run, every other resume flag ignored."""

    def named(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return text.strip()

    return named


# The options logged as run params, with the parser that reads them back from a param. A pipeline
# records those it offers: checkpoint_every_steps only where parse(..., steps=True).
RECORDED: dict[str, Callable[[str], Any]] = {
    "lr": _rate,
    "batch_size": _positive_int,
    "seed": _seed,
    "checkpoint_every": _interval,
    "checkpoint_every_steps": _interval,
    "keep_last": _count,
    "keep_best": _count,
    "monitor": str,
    "monitor_mode": str,
}


@dataclass(frozen=True)
class Options:
    """A parsed command line; ``given`` holds the recorded options that were passed explicitly,
    ``defaults`` every option this pipeline records."""

    epochs: int
    experiment: str | None
    resume: str | None
    from_epoch: int | None
    new_run: bool
    override: bool
    given: dict[str, Any]
    defaults: dict[str, Any]
    strategy: str | None = None  # "ddp" or "fsdp" under torchrun (see pipelines.parallel)
    from_step: int | None = None  # --from-step, where parse(..., steps=True)
    epochs_given: bool = True  # False: --epochs left out, epochs is the default (a resume goes on to its run's target)

    def settings(self, recorded: Mapping[str, str] | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Every recorded option's value: given > the resumed run's param > default.

        A recorded value that its option would refuse (a param or override tag edited by hand) is a
        :class:`~tracking.errors.TrackingError` that names run ``run_id`` and the option that replaces it.
        """
        recorded = recorded or {}
        values = dict(self.defaults)
        for name, text in recorded.items():
            if name in self.defaults and name not in self.given:
                values[name] = _read_back(name, text, run_id)
        values.update(self.given)
        # A --monitor given without --monitor-mode infers its mode; given as recorded, the run's mode stays.
        new_monitor = "monitor" in self.given and self.given["monitor"] != recorded.get("monitor")
        if values["monitor_mode"] is None or (new_monitor and "monitor_mode" not in self.given):
            values["monitor_mode"] = "max" if values["monitor"].endswith("accuracy") else "min"
        # A run saves by one interval: the one given, else the recorded one; the other is none.
        for name, other in (INTERVALS, INTERVALS[::-1]):
            if name in self.given and other in values:
                values[other] = None
        return values

    def params(self, values: Mapping[str, Any]) -> dict[str, str]:
        """The recorded options' ``values`` as the run's params."""
        return {name: param_value(name, values[name]) for name in self.defaults}

    def conflicts(self, recorded: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """Options whose value differs from the resumed run's param: name -> (recorded, new). The given ones, and
        those that follow from them (--monitor's inferred --monitor-mode, the interval not given), which an
        override must record too: else a later resume went on with --monitor's new metric and its old mode."""
        values = self.settings(recorded)
        return {
            name: (recorded[name], param_value(name, values[name]))
            for name in self.defaults
            if name in recorded and not _reads_as(name, recorded[name], values[name])
        }


def _read_back(name: str, text: str, run_id: str | None) -> Any:
    try:
        return RECORDED[name](text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        flag = "--" + name.replace("_", "-")
        raise TrackingError(
            f"run {run_id} records {name} {text!r} (its param, or its tag tracking.override.{name}), which {flag} "
            f"would refuse: {exc}. Pass {flag} with the value to go on with, and --override."
        ) from None


def _reads_as(name: str, text: str, value: Any) -> bool:
    try:
        return bool(RECORDED[name](text) == value)
    except (argparse.ArgumentTypeError, ValueError):
        return False  # a value edited by hand into one its option refuses: the given one replaces it


def param_value(name: str, value: Any) -> str:
    """Option ``name``'s ``value`` as a param (and as its default in ``--help``)."""
    if value is None:
        return NONE if name in INTERVALS else ALL
    return str(value)


def parse(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    defaults: Mapping[str, Any],
    steps: bool = False,
) -> Options:
    """Parse a training pipeline's command line; ``defaults`` override the shared ones per pipeline.

    ``steps``: the pipeline also saves every N optimizer steps (``--checkpoint-every-steps``, recorded)
    and resumes from a step's checkpoint (``--from-step``), a save in mid-epoch included: every training
    pipeline does (the own-loop ones, and the framework ones, whose Trainer resumes mid-epoch).
    """
    merged = {**DEFAULTS, **defaults}
    names = [name for name in RECORDED if steps or name != "checkpoint_every_steps"]
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        help="total epochs to reach; a resumed run trains the ones left (default: "
        f"{merged['epochs']}; a resume of a run that recorded its target: that target)",
    )
    parser.add_argument(
        "--experiment",
        type=_named("an experiment name"),
        help="MLflow experiment for a new run (default: $TRACKING_EXPERIMENT or pytorch-checkpoints; "
        "a --new-run child: its parent's)",
    )
    recorded = parser.add_argument_group(
        "recorded options", "logged as run params; a resumed run reuses its recorded values unless given again"
    )

    def add(flag: str, help: str, shown: str | None = None, **kwargs: Any) -> None:
        name = flag[2:].replace("-", "_")
        default = shown or param_value(name, merged[name])
        # SUPPRESS keeps options that were not given out of the namespace, so that a
        # resumed run can tell them from the ones its params should fill in.
        recorded.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} (default: {default})", **kwargs)

    add("--lr", "learning rate", type=_rate)
    add("--batch-size", "training batch size", type=_positive_int)
    add("--seed", "seed for the initial weights and the batch order", type=_seed)
    add("--checkpoint-every", "log a checkpoint every N epochs, and after the last", type=_positive_int, metavar="N")
    if steps:
        add(
            "--checkpoint-every-steps",
            "log a checkpoint every N optimizer steps, and after the last, keyed by global step "
            "(checkpoint-step-00000120), instead of every N epochs",
            type=_positive_int,
            metavar="N",
        )
    add("--keep-last", "keep the last N checkpoints (all: delete none)", type=_count, metavar="N|all")
    add("--keep-best", "also keep the best N checkpoints by --monitor (all: delete none)", type=_count, metavar="N|all")
    add("--monitor", "metric that ranks checkpoints", choices=METRICS)
    inferred = "max for accuracies, min otherwise" if merged["monitor_mode"] is None else None
    add("--monitor-mode", "whether lower or higher --monitor is better", inferred, choices=("min", "max"))
    resume = parser.add_argument_group("resuming")
    resume.add_argument(
        "--resume",
        type=_named("a run ID, runs:/RUN_ID or a checkpoint's models:/ URI"),
        metavar="RUN_ID",
        help="continue run RUN_ID (or runs:/RUN_ID) from its latest checkpoint (a checkpoint's models:/ URI: from "
        "that checkpoint)",
    )
    resume.add_argument(
        "--from-epoch", type=_positive_int, metavar="N", help="resume from epoch N's checkpoint instead"
    )
    if steps:
        resume.add_argument(
            "--from-step",
            type=_positive_int,
            metavar="N",
            help="resume a run saved by steps from global step N's checkpoint instead",
        )
    resume.add_argument(
        "--new-run", action="store_true", help="resume into a new child run instead of continuing RUN_ID"
    )
    resume.add_argument(
        "--override",
        action="store_true",
        help="allow options that differ from RUN_ID's params (recorded in its tracking.overrides and "
        "tracking.override.<param> tags; its later resumes keep them)",
    )
    parallel = parser.add_argument_group("several processes (under torchrun)")
    parallel.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        help="train with every rank of a torchrun job: ddp replicates the model (rank 0 writes checkpoints), "
        "fsdp shards it with FSDP2 (every rank writes its shards); default under torchrun: ddp",
    )
    args = parser.parse_args(argv)
    from_step = getattr(args, "from_step", None)
    if args.resume is None and (args.from_epoch is not None or from_step is not None or args.new_run or args.override):
        parser.error(f"--from-epoch, {'--from-step, ' if steps else ''}--new-run and --override need --resume RUN_ID")
    if args.experiment is not None and args.resume is not None and not args.new_run:
        # Else ignored: a run resumed in place goes on in the experiment it is in.
        parser.error(
            "--experiment names the experiment a new run starts in, and --resume RUN_ID goes on in RUN_ID, in its "
            "own: leave --experiment out (a --new-run child may start in another experiment)"
        )
    if hasattr(args, "checkpoint_every") and hasattr(args, "checkpoint_every_steps"):
        parser.error("--checkpoint-every (epochs) and --checkpoint-every-steps: a run saves by one of them; pass one")
    if args.from_epoch is not None and from_step is not None:
        parser.error("--from-epoch and --from-step: a checkpoint is picked by one of them; pass one")
    return Options(
        epochs=merged["epochs"] if args.epochs is None else args.epochs,
        experiment=args.experiment,
        resume=args.resume,
        from_epoch=args.from_epoch,
        new_run=args.new_run,
        override=args.override,
        given={name: getattr(args, name) for name in names if hasattr(args, name)},
        defaults={name: merged[name] for name in names},
        strategy=args.strategy,
        from_step=from_step,
        epochs_given=args.epochs is not None,
    )


def run_pipeline(train: Callable[[], str]) -> int:
    """Run a pipeline's ``train`` as its command: the exit status, errors as one line on stderr (status 1; 2 for a
    run whose training still runs on this host, :class:`~pipelines.trainer.RunInUseError`)."""
    # Every MLflow call of the run fails in about 30 s when the tracking server is gone, not minutes.
    bound_mlflow_requests()
    # MLflow's own "View run" links open the UI's GenAI view; the pipeline prints training-view ones.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    def run() -> str:
        from tracking.cli.server import connect, mlflow_failure

        # No MLFLOW_TRACKING_URI: the local stack if it runs, never an mlflow.db in the working folder.
        connect()
        try:
            return train()
        except Exception as exc:
            ours = mlflow_failure(exc)  # a failed request says which server and what to check
            if ours is None:
                raise
            raise ours from exc

    from mlflow.exceptions import MlflowException

    try:
        # MLflow's own errors (a refused request, an unknown run) are the user's to act on, like ours.
        # A run whose training still runs here is refused as a usage error is (2): not now, whatever the flags.
        return run_command(run, also=(MlflowException,), refused=(RunInUseError,))
    except KeyboardInterrupt as interrupted:
        # Ctrl-C: one line (where the run stands, once pipelines.runs.start ended it), not a traceback.
        print_error(str(interrupted) or "interrupted (Ctrl-C).")
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
