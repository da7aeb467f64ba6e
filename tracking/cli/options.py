"""The arguments and options the commands share, and the checks behind them: a run source, --checkpoint, --json."""

from __future__ import annotations

from typing import Any, Protocol

import click
from click.core import ParameterSource

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _check_experiment(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # An empty name listed the default experiment's runs, as if --experiment had been left out.
    if value is not None and not value.strip():
        raise click.BadParameter(
            f"{value!r} names no experiment: pass its name, e.g. --experiment pytorch-checkpoints."
        )
    return value


experiment_option = click.option(
    "--experiment",
    callback=_check_experiment,
    help="Experiment name (default: $TRACKING_EXPERIMENT, else pytorch-checkpoints).",
)


class Keyed(Protocol):
    """A checkpoint as listed, stored or described by its manifest: what it is keyed by, and its numbers."""

    @property
    def keyed_by(self) -> str: ...
    @property
    def key(self) -> int | None: ...
    @property
    def epoch(self) -> int | None: ...
    @property
    def step(self) -> int | None: ...


def key_fields(checkpoint: Keyed) -> dict[str, Any]:
    """What every JSON row about a checkpoint carries, whatever its run is keyed by: ``key``, ``keyed_by``,
    ``epoch`` and ``step`` (the global step it recorded, else null)."""
    step = checkpoint.step
    if step is None and checkpoint.keyed_by == "step":
        step = checkpoint.key  # a logged model whose step param is gone: its name says
    keyed_by = checkpoint.keyed_by if checkpoint.key is not None else None  # a state dict is keyed by nothing
    return {"key": checkpoint.key, "keyed_by": keyed_by, "epoch": checkpoint.epoch, "step": step}


def _check_source(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from tracking.uri import parse_source

    try:
        parsed = parse_source(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if parsed.artifact_path:  # the library reads runs:/<id>/<path> in load_model(); no command takes a path
        picks = any(option.name == "checkpoint" for option in ctx.command.params)
        raise click.BadParameter(
            f"{value}: {parsed.artifact_path!r} names an artifact, not a checkpoint; pass runs:/{parsed.run_id}"
            + (" and pick the checkpoint with --checkpoint." if picks else ".")
        )
    return value


source_argument = click.argument("source", metavar="RUN", callback=_check_source)


def is_epoch(value: str) -> bool:
    """True for an epoch number as the library reads one: ASCII digits only (not "²" or "١")."""
    return value.isdecimal() and value.isascii()


# What --checkpoint takes, as its refusals say.
CHECKPOINT_CHOICES = "latest, best or an epoch number (e.g. 7; a step, e.g. 1500, in a run keyed by step)"


def refuse_checkpoint_of_pinned(source: str, checkpoint: str) -> None:
    """A usage error when --checkpoint was given to pick among the checkpoints of a source that names one."""
    ctx = click.get_current_context()
    if not source.strip().startswith("models:/") or checkpoint == "latest":
        return
    if ctx.get_parameter_source("checkpoint") in (ParameterSource.DEFAULT, None):
        return
    raise click.BadParameter(
        f"{source} names one checkpoint already; --checkpoint picks among a run's checkpoints: "
        "leave it out, or pass the run ID instead.",
        param_hint="--checkpoint",
    )


def refuse_one_model(command: str, acts_on: str, source: str) -> None:
    """A usage error for a ``models:/`` source given to a command that acts on a whole run: it names the run."""
    from tracking.source import resolve_run_id

    run_id = resolve_run_id(source)
    raise click.UsageError(
        f"{command} {acts_on}, and {source} names one model of run {run_id}: pass the run ID, "
        f"`tracking {command} {run_id}` with the same options."
    )


def _check_selector(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in ("latest", "best", "state_dict") or is_epoch(value):
        return value
    raise click.BadParameter(f"{value!r}: expected {CHECKPOINT_CHOICES}, or state_dict.")


# --checkpoint of the commands that read one manifest's files: a checkpoint, or the run's state dict.
selector_option = click.option(
    "--checkpoint",
    default="latest",
    show_default=True,
    callback=_check_selector,
    help="latest, best, an epoch number (a step in a run keyed by step), or state_dict (the run's state dict).",
)


def find_selected(source: str, checkpoint: str) -> Any:
    """The checkpoint, or with ``state_dict`` the run's state dict, that ``--checkpoint`` picks of ``source``."""
    from tracking.selection import find_checkpoint, find_state_dict

    return find_state_dict(source) if checkpoint == "state_dict" else find_checkpoint(source, checkpoint)
