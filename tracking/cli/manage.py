"""Commands that copy or change: ``download``, ``gc``, ``register``."""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tracking import layout
from tracking.cli.noise import muted
from tracking.cli.options import (
    CHECKPOINT_CHOICES,
    find_selected,
    is_epoch,
    json_option,
    key_fields,
    refuse_checkpoint_of_pinned,
    refuse_one_model,
    selector_option,
    source_argument,
)
from tracking.cli.server import connect
from tracking.errors import one_line
from tracking.layout import UI_VIEW_QUERY
from tracking.output import echo, emit_json, human_size, json_error, plural

if TYPE_CHECKING:
    from tracking.storage.base import Buffer

# Files at least this big get a progress bar on a terminal.
_PROGRESS_FROM_BYTES = 32 * 2**20


def _folder(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    # click takes "" for the current folder: `--to "$DIR"` with DIR unset would download into wherever one stands.
    if not value.strip():
        raise click.BadParameter(
            f"{value!r} names no folder: pass one, e.g. --to downloads/best (--to . for this one)."
        )
    return Path(value)


@click.command()
@source_argument
@selector_option
@click.option(
    "--to", "to", required=True, type=click.Path(file_okay=False), callback=_folder, help="Folder to write into."
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite files that exist in the folder, and remove those of a previous download this checkpoint lacks.",
)
@json_option
def download(source: str, checkpoint: str, to: Path, force: bool, as_json: bool) -> None:
    """Download a checkpoint's files and manifest, each checked against its sha256.

    RUN is a run ID, runs:/<id>, a checkpoint's models:/<model_id> or models:/<name>@<alias>.
    The last line says how to read what was written: `torch.load(DIR/checkpoint.pt,
    weights_only=True)` (DIR/state_dict.pt with --checkpoint state_dict) without this tool. A
    sharded (FSDP2) checkpoint's shards and their index (dcp.json) load from the run instead:
    tracking.load("models:/<model_id>"), or on every rank tracking.restore(..., model, optimizer).

    \b
    Example:
      tracking download 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c --checkpoint best --to downloads/best
    """
    refuse_checkpoint_of_pinned(source, checkpoint)
    connect()
    from tracking.downloader import download_files

    located = find_selected(source, checkpoint)
    done = download_files(
        located, to, force=force, read=lambda found, name, expected: _read(found, name, expected, as_json)
    )
    what = located.label if located.model_id else f"run {located.run_id} {located.label}"
    if as_json:
        files = {name: {"size": f.size, "sha256": f.sha256} for name, f in located.manifest.files.items()}
        emit_json(
            {
                "run_id": located.run_id,
                "model_id": located.model_id,
                **key_fields(located.manifest),
                "to": str(to),
                "files": files,
                "removed": done.removed,
                "kept": done.kept,
            }
        )
        return
    sizes = ", ".join(f"{name} ({human_size(f.size)})" for name, f in located.manifest.files.items())
    echo(f"downloaded {what} to {to}: {sizes}, manifest.json; sha256 checked")
    if done.removed:
        echo(f"removed {', '.join(done.removed)}: the previous download's, which this checkpoint has not")
    if force and done.kept:  # what --force left beside the checkpoint: the folder is not only a download
        echo(f"kept {', '.join(done.kept)}: not from a download (no manifest.json listed them)")
    echo(_how_to_read(located, to))


def _how_to_read(located: Any, to: Path) -> str:
    """How to read the files a download wrote into ``to``, by what they are: one line."""
    from tracking.manifest import SHARDED_KIND

    manifest = located.manifest
    if manifest.kind == SHARDED_KIND:
        # Its index is JSON, not the pickled .metadata torch.distributed.checkpoint reads: only the library reads it.
        source = f"models:/{located.model_id}"
        return (
            f"read it from the run: tracking.load({source!r}) in one process (a full model and optimizer), or "
            f"tracking.restore({source!r}, model, optimizer) on every rank under torchrun; its shards' index "
            "(dcp.json) is JSON, not the pickled .metadata that torch.distributed.checkpoint reads on its own"
        )
    if manifest.format == "transformers":
        return (
            f"read it as the Hugging Face Trainer checkpoint folder it is: Trainer.train(resume_from_checkpoint="
            f"{str(to)!r}), or the model class's from_pretrained({str(to)!r})"
        )
    name = next(iter(manifest.files))  # a checkpoint or state dict of one process: one file
    path = str(to / name)
    if name.endswith(".safetensors"):
        return f"read it with model.load_state_dict(safetensors.torch.load_file({path!r}))"
    if manifest.kind == "state_dict":
        return f"read it with model.load_state_dict(torch.load({path!r}, weights_only=True))"
    keys = (
        "state_dict, optimizer_states, epoch, ..."
        if manifest.format == "lightning"
        else "model_state, optim_state, epoch, ..."
    )
    return f"read it with torch.load({path!r}, weights_only=True): a dict of {keys}"


def _read(located: Any, name: str, expected: Any, as_json: bool) -> Buffer:
    """One file of a checkpoint, sha256-checked; with a progress bar when it is big and stdout a terminal."""
    if not (sys.stdout.isatty() and not as_json and expected.size >= _PROGRESS_FROM_BYTES):
        return located.read(name)  # type: ignore[no-any-return]
    from rich.markup import escape
    from rich.progress import DownloadColumn, Progress, TaskID, TransferSpeedColumn

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as bar:
        task = bar.add_task(escape(name), total=expected.size)  # a file name from the manifest: not markup

        def advance(n: int, bar: Progress = bar, task: TaskID = task) -> None:
            bar.advance(task, n)

        return located.read(name, progress=advance)  # type: ignore[no-any-return]


@click.command()
@source_argument
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the N newest checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=1), help="Keep the K best by --monitor.")
@click.option("--monitor", help="Metric ranking 'best' (default: the run's, else val_loss).")
@click.option(
    "--mode",
    type=click.Choice(["min", "max"]),
    help="Whether lower or higher --monitor is better (default: the run's; needed for a --monitor not the run's).",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; change nothing.")
@click.option(
    "--delete-registered", is_flag=True, help="Delete checkpoints that registry versions point at too (kept otherwise)."
)
@click.option("--force", is_flag=True, help="Delete even while the run is RUNNING (its trainer was killed).")
@json_option
def gc(
    source: str,
    keep_last: int | None,
    keep_best: int | None,
    monitor: str | None,
    mode: str | None,
    dry_run: bool,
    delete_registered: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Delete a run's checkpoints outside the last N and the best K (the latest always stays).

    RUN is a run ID or runs:/<id>: retention acts on a whole run, so a models:/ URI is refused.

    Each goes manifest first, then its files, then its logged model, as a Checkpointer's
    retention does during training. A checkpoint that a registry version points at stays
    unless --delete-registered; a RUNNING run is refused unless --force.

    \b
    Example:
      tracking gc 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c --keep-last 2 --keep-best 1 --dry-run
    """
    if keep_last is None and keep_best is None:
        raise click.UsageError("pass --keep-last and/or --keep-best.")
    if keep_best is None and (monitor or mode):  # they would change nothing: say so rather than ignore them
        raise click.UsageError("--monitor and --mode rank what --keep-best keeps: pass --keep-best N, or drop them.")
    connect()
    from tracking.pruning import best_moved_line, prune_report, registered_line
    from tracking.source import resolve_run_id

    if source.strip().startswith("models:/"):  # retention is a run's: it would not spare the checkpoint named
        refuse_one_model("gc", "keeps the last and best checkpoints of a whole run", source)
    run_id = resolve_run_id(source)
    try:
        report = prune_report(
            run_id,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            dry_run=dry_run,
            delete_registered=delete_registered,
            running=force,
        )
    except ValueError as exc:  # the options are checked above: what is left is a ranking the run's tags contradict
        raise click.UsageError(str(exc)) from None  # or a --monitor the checkpoints lack; each message says which
    doomed = report.deleted
    if as_json:
        emit_json(
            {
                "run_id": run_id,
                "dry_run": dry_run,
                "needs_force": report.needs_force,
                "deleted": [{**key_fields(c), "model_id": c.model_id} for c in doomed],
                "kept_registered": [
                    {**key_fields(c), "model_id": c.model_id, "versions": versions} for c, versions in report.registered
                ],
                "best_moved": _best_moved_json(report.best_moved),
                "failed": [{**key_fields(c), "model_id": c.model_id} for c in report.failed],
                # The error object a failing --json command prints, in the report rather than after it.
                **(json_error(one_line(report.error), 1, report.error) if report.error else {}),
            }
        )
    if report.error is not None:
        raise report.error  # its line names what was deleted all the same
    if as_json:
        return
    verb = "would delete" if dry_run else "deleted"
    for checkpoint in doomed:
        echo(f"{verb} {layout.label(checkpoint.keyed_by, checkpoint.key)} ({checkpoint.model_id})")
    for checkpoint, versions in report.registered:
        echo(registered_line(checkpoint, versions))
    if report.best_moved is not None:
        echo(best_moved_line(report.best_moved, dry_run=dry_run))
    done = "would be deleted (dry run: nothing changed)" if dry_run else "deleted"
    if report.needs_force:
        done += "; the run is still RUNNING: without --dry-run, gc refuses it unless --force (its trainer was killed)"
    echo(f"run {run_id}: {plural(len(doomed), 'checkpoint')} {done}")


@click.command()
@source_argument
@click.argument("name")
@click.option(
    "--checkpoint",
    default="best",
    show_default=True,
    help="latest, best or an epoch number (a step in a run keyed by step; a models:/<model_id> RUN names one).",
)
@click.option("--alias", help="Point this alias of NAME at the new version (e.g. champion).")
@click.option(
    "--allow-mixed", is_flag=True, help="Register even when NAME holds versions that are no checkpoint (whole models)."
)
@json_option
def register(source: str, name: str, checkpoint: str, alias: str | None, allow_mixed: bool, as_json: bool) -> None:
    """Register a checkpoint as a new version of model NAME, loadable as models:/NAME@ALIAS.

    A checkpoint a version of NAME was made from already gets no second one: that version is
    reused (ALIAS moved to it), so a registration that failed part way is safe to run again.

    \b
    Example:
      tracking register 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c seed --checkpoint best --alias champion
      python -c 'import pipelines.models, tracking; print(tracking.load("models:/seed@champion").epoch)'

    (The loader imports no module a manifest names: import the model's class first, here the
    pipelines' models.)
    """
    if checkpoint not in ("latest", "best") and not is_epoch(checkpoint):
        raise click.BadParameter(f"{checkpoint!r}: expected {CHECKPOINT_CHOICES}.", param_hint="--checkpoint")
    if not name.strip():
        raise click.BadParameter(f"{name!r}: a registered model needs a name, e.g. seed.", param_hint="NAME")
    refuse_checkpoint_of_pinned(source, checkpoint)
    from tracking.registry import alias_version, check_alias, check_model_name, registration
    from tracking.source import version_model_id

    try:
        check_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if alias is not None:
        try:
            check_alias(alias)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--alias") from None
    connect()
    moved_from = alias_version(name, alias) if alias is not None else None  # the version the alias leaves
    # MLflow logs that it waits for the new version at INFO; the version is READY at once here.
    with muted("mlflow.store.model_registry.abstract_store", "Waiting up to"):
        registered = registration(source, name, checkpoint=checkpoint, alias=alias, allow_mixed=allow_mixed)
    version = registered.version
    if moved_from == str(version.version):
        moved_from = None  # the alias named the reused version already: it moved nowhere
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    if as_json:
        tags = dict(version.tags or {})
        emit_json(
            {
                "name": name,
                "version": version.version,
                "reused": registered.reused,
                "alias": alias,
                "alias_moved_from": moved_from,
                "source": version.source,
                "uri": uri,
                "run_id": version.run_id,
                "model_id": version_model_id(version),
                "checkpoint": tags.get(layout.VERSION_TAG_CHECKPOINT),
                "key": _number(tags.get(layout.VERSION_TAG_KEY)),
                "keyed_by": tags.get(layout.VERSION_TAG_KEYED_BY),
                "epoch": _number(tags.get(layout.VERSION_TAG_EPOCH)),
                "step": _number(tags.get(layout.VERSION_TAG_STEP)),
                "tags": tags,
            }
        )
        return
    if registered.reused:
        echo(f"{name} version {version.version} already holds {version.source}: reused it; load it as {uri}")
    else:
        echo(f"registered {name} version {version.version} from {version.source}; load it as {uri}")
    if moved_from is not None:
        echo(f"alias {alias} named version {moved_from} before; models:/{name}/{moved_from} still loads it")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking_uri.startswith(("http://", "https://")):
        page = f"#/models/{urllib.parse.quote(name)}/versions/{version.version}{UI_VIEW_QUERY}"
        echo(f"in the UI: {tracking_uri.rstrip('/')}/{page}")


def _best_moved_json(moved: Any) -> dict[str, Any] | None:
    """gc's ``best_moved``: the run's best checkpoint it deletes, the one best moves to, and the metric ranking it."""
    if moved is None:
        return None
    to = moved.to
    return {
        "from": {**key_fields(moved.deleted), "model_id": moved.deleted.model_id},
        "to": None if to is None else {**key_fields(to), "model_id": to.model_id},
        "monitor": moved.monitor,
        "was_monitor": moved.was_monitor,
    }


def _number(tag: str | None) -> int | None:
    return int(tag) if tag is not None else None


COMMANDS = (download, gc, register)
