"""Commands that read: ``runs``, ``checkpoints``, ``show``, ``verify``."""

from __future__ import annotations

import logging
from typing import Any

import click

from tracking.cli.options import (
    experiment_option,
    find_selected,
    json_option,
    key_fields,
    refuse_checkpoint_of_pinned,
    refuse_one_model,
    selector_option,
    source_argument,
)
from tracking.cli.server import connect
from tracking.errors import StorageError, one_line
from tracking.output import Column, agree, echo, emit_json, human_size, json_error, plural, table

_log = logging.getLogger(__name__)


@click.command()
@experiment_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest runs to list.")
@json_option
def runs(experiment: str | None, limit: int, as_json: bool) -> None:
    """List an experiment's runs: status, checkpoints, latest and best, size on the store.

    \b
    Example:
      tracking runs --experiment pytorch-checkpoints
    """
    connect()
    from mlflow.tracking import MlflowClient

    from tracking.config import TrackingConfig
    from tracking.errors import NotFoundError

    config = TrackingConfig.from_env(experiment_name=experiment) if experiment else TrackingConfig.from_env()
    client = MlflowClient(config.tracking_uri)
    found = client.get_experiment_by_name(config.experiment_name)
    if found is None:
        raise NotFoundError(
            f"no experiment {config.experiment_name!r} on {client.tracking_uri}; pass --experiment with one "
            "that exists (the MLflow UI lists them)."
        )
    if found.lifecycle_stage == "deleted":
        # Its runs went with it: the table would be empty, as if the experiment had never had any.
        raise NotFoundError(
            f"experiment {config.experiment_name!r} is deleted (ID {found.experiment_id}); restore it with "
            f"`MLFLOW_TRACKING_URI={client.tracking_uri} mlflow experiments restore --experiment-id "
            f"{found.experiment_id}`, or pass --experiment with another."
        )
    listed = client.search_runs([found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    unreadable: list[StorageError] = []
    summaries = [_run_summary(run, config, unreadable) for run in listed]
    if unreadable and len(unreadable) == len(listed):
        raise unreadable[0]  # no run's store answers: the settings are wrong, not one run's location
    for problem in unreadable:
        _log.warning("%s; its size is left out (?)", one_line(problem).rstrip("."))
    if as_json:
        emit_json(summaries)
        return
    columns = [
        Column("run ID", no_wrap=True),
        Column("name", drop_order=1),
        Column("made by", drop_order=3, fold_to=20),
        Column("status", drop_order=5),
        Column("checkpoints", drop_order=4),
        Column("latest", drop_order=6),
        Column("best", drop_order=7, fold_to=15),
        Column("size", drop_order=2),
    ]
    rows = [
        [
            s["run_id"],
            s["run_name"] or "",
            _made_by(s),
            s["status"],
            str(s["checkpoints"]),
            _key(s, "latest") or "-",
            _best(s),
            "?" if s["size_bytes"] is None else human_size(s["size_bytes"]),
        ]
        for s in summaries
    ]
    table(f"runs of {config.experiment_name}", columns, rows)


def _best(summary: dict[str, Any]) -> str:
    best = _key(summary, "best")
    if best is None:
        return "-"
    if summary["best_value"] is None:  # the monitor tag names a metric the checkpoint lacks
        return best
    return f"{best} {summary['monitor']}={summary['best_value']:.4g}"


def _key(summary: dict[str, Any], which: str) -> str | None:
    """``epoch 7``, or ``step 1500`` in a run keyed by step, for the latest or best checkpoint."""
    key = summary[f"{which}_key"]
    return None if key is None else f"{summary['keyed_by']} {key}"


def _made_by(summary: dict[str, Any]) -> str:
    """The pipeline that made a run, else its model's class (``module:QualName`` -> ``QualName``)."""
    if summary["pipeline"]:
        return str(summary["pipeline"])
    if summary["model_class"]:
        return str(summary["model_class"]).rpartition(":")[2]
    return "-"


def _run_summary(run: Any, config: Any, unreadable: list[StorageError]) -> dict[str, Any]:
    """A row of ``tracking runs``. A run whose store cannot be read (a bucket these credentials may not read)
    gets no size, and its error goes to ``unreadable``: one such run must not hide the others."""
    from tracking import catalog, layout
    from tracking.errors import IntegrityError, NotFoundError
    from tracking.run import open_run
    from tracking.selection import warn_unreadable

    handle = open_run(run.info.run_id, config)
    committed = catalog.committed(handle)
    keyed_by = catalog.keyed_by(handle, committed.values())
    total = 0
    model_class = run.data.params.get("model_class")
    try:
        for key, checkpoint in sorted(committed.items()):
            try:
                manifest = checkpoint.read_manifest()
            except NotFoundError:
                # No manifest, no checkpoint (a deletion that died after it): not counted, nor latest or best,
                # as `tracking checkpoints` and the loader leave it out.
                del committed[key]
                continue
            except IntegrityError as exc:
                warn_unreadable(run.info.run_id, checkpoint, exc)
                continue
            total += sum(f.size for f in manifest.files.values())
            model_class = str(manifest.model.get("class") or model_class)  # the newest checkpoint's
        try:
            total += sum(f.size for f in layout.read_manifest(handle.store, layout.STATE_DICT_DIR).files.values())
        except NotFoundError:
            pass
        size: int | None = total
    except StorageError as exc:
        unreadable.append(exc)
        size = None
    tags = run.data.tags
    monitor = tags.get(layout.TAG_MONITOR)
    by_model = {c.model_id: c for c in committed.values()}
    # A tag naming no committed checkpoint (deleted or edited by hand) is stale: the search says, as for the loader.
    latest = by_model.get(tags.get(layout.TAG_LATEST, "")) or (committed[max(committed)] if committed else None)
    best = by_model.get(tags.get(layout.TAG_BEST, "")) or _ranked_best(committed, monitor, tags.get(layout.TAG_MODE))
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        # Which code made the run: the pipelines log their module as the `pipeline` param.
        "pipeline": run.data.params.get("pipeline"),
        "model_class": model_class,
        "status": run.info.status,
        "checkpoints": len(committed),
        "keyed_by": keyed_by,
        **{f"latest_{name}": value for name, value in _numbers(latest).items()},
        "latest_model_id": latest.model_id if latest is not None else None,
        **{f"best_{name}": value for name, value in _numbers(best).items()},
        "best_model_id": best.model_id if best is not None else None,
        "monitor": monitor,
        "best_value": best.metrics.get(monitor or "") if best is not None else None,
        "size_bytes": size,
    }


def _numbers(checkpoint: Any) -> dict[str, Any]:
    """A run's latest or best checkpoint (None when it has none) as ``key``, ``epoch`` and ``step``."""
    if checkpoint is None:
        return dict.fromkeys(("key", "epoch", "step"))
    fields = key_fields(checkpoint)
    return {name: fields[name] for name in ("key", "epoch", "step")}


def _ranked_best(committed: dict[int, Any], monitor: str | None, mode: str | None) -> Any:
    """The best of a run's committed checkpoints by its monitor tag (None without one), ranked as the loader does."""
    from tracking import layout

    if not monitor:
        return None
    ranked = layout.best_first(
        {key: c.metrics.get(monitor) for key, c in committed.items()}, mode if mode in layout.MODES else "min"
    )
    return committed[ranked[0]] if ranked else None


@click.command()
@source_argument
@json_option
def checkpoints(source: str, as_json: bool) -> None:
    """List a run's committed checkpoints (each an MLflow logged model) with their metrics.

    RUN is a run ID or runs:/<id>; a checkpoint's models:/<model_id> or models:/<name>@<alias>
    lists the checkpoints of the run that logged it.

    \b
    Example:
      tracking checkpoints 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c
    """
    connect()
    from tracking import layout
    from tracking.errors import TrackingError
    from tracking.selection import find_checkpoint, list_checkpoints
    from tracking.source import resolve_run_id

    run_id = resolve_run_id(source)  # a models:/ source names one checkpoint: latest and best are its run's
    logged = list_checkpoints(run_id)
    marks: dict[str, str | None] = {}
    for which in ("latest", "best"):
        try:
            marks[which] = find_checkpoint(run_id, which).model_id if logged else None
        except TrackingError:
            marks[which] = None  # no monitored metric, or the one it names is damaged (warned above)
    latest, best = marks["latest"], marks["best"]
    found: list[dict[str, Any]] = [
        {
            **key_fields(c),
            "model_id": c.model_id,
            "uri": c.uri,
            "metrics": c.metrics,
            "size_bytes": sum(f.size for f in c.manifest.files.values()),
            "created_at": c.manifest.created_at,
            "latest": c.model_id == latest,
            "best": c.model_id == best,
            # Only a checkpoint of several optimizers by name says so (a list of one stays as it was).
            **({"optimizers": sorted(c.manifest.optimizers)} if c.manifest.optimizers else {}),
        }
        for c in logged
    ]
    if as_json:
        emit_json(found)
        return
    if not found:
        from tracking.alternatives import what_else_loads
        from tracking.run import open_run

        echo(f"{source}: no committed checkpoints; {what_else_loads(open_run(run_id))}")
        return
    # The run's key names its checkpoints and stays; the other goes first on a narrow terminal.
    stepped = any(c.keyed_by == layout.STEP for c in logged)
    columns = [
        Column("epoch", drop_order=1 if stepped else 99),
        Column("step", drop_order=99 if stepped else 1),
        Column("metrics", drop_order=3, fold_to=20),
        Column("size", drop_order=2),
        Column("model ID", no_wrap=True),
        Column("", fold_to=6),
    ]
    named = any("optimizers" in c for c in found)
    if named:
        columns.insert(3, Column("optimizers", drop_order=4, fold_to=12))
    rows = [
        [
            str(c["epoch"]),
            "-" if c["step"] is None else str(c["step"]),
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(c["metrics"].items())),
            *([", ".join(c.get("optimizers", ["-"]))] if named else []),
            human_size(c["size_bytes"]),
            str(c["model_id"]),
            "\n".join(mark for mark in ("latest", "best") if c[mark]),
        ]
        for c in found
    ]
    table(f"checkpoints of {source}", columns, rows)


@click.command()
@source_argument
@selector_option
@json_option
def show(source: str, checkpoint: str, as_json: bool) -> None:
    """Print a checkpoint's manifest (or with --checkpoint state_dict, the run's state dict's) as JSON.

    RUN is a run ID, runs:/<id>, a checkpoint's models:/<model_id> or models:/<name>@<alias>.
    --json wraps the manifest with the checkpoint's model ID and artifact location.

    \b
    Example:
      tracking show 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c --checkpoint best
    """
    refuse_checkpoint_of_pinned(source, checkpoint)
    connect()
    import json

    located = find_selected(source, checkpoint)
    manifest = json.loads(located.manifest.to_json())
    if as_json:
        emit_json(
            {
                "run_id": located.run_id,
                "model_id": located.model_id,
                **key_fields(located.manifest),
                "uri": located.logged().uri,  # models:/<model_id>, or runs:/<run_id>/state_dict
                "artifact_uri": located.store.artifact_uri,
                "manifest": manifest,
            }
        )
        return
    click.echo(f"# {located.store.describe(located.path('manifest.json'))}", err=True)
    echo(located.manifest.to_json().decode())


@click.command()
@source_argument
@click.option("--clean", is_flag=True, help="First remove leftovers: unfinished uploads, data no manifest lists.")
@click.option("--force", is_flag=True, help="With --clean: also when the run is still RUNNING (its writer was killed).")
@json_option
def verify(source: str, clean: bool, force: bool, as_json: bool) -> None:
    """Check a run's stored files against their manifests' size and sha256.

    RUN is a run ID or runs:/<id>; a checkpoint's models:/<model_id> or models:/<name>@<alias>
    checks that checkpoint only. Also lists leftovers of saves that died before committing
    and of deletions that died after the manifest (LEFTOVER lines): they are not failures,
    nothing loads them; --clean removes a run's (finishing those deletions), never touching a
    committed checkpoint.

    \b
    Example:
      tracking verify 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c --clean
    """
    if force and not clean:
        raise click.UsageError("--force only applies with --clean.")
    connect()
    from tracking.audit import UNFINISHED_DELETION, clean_leftovers
    from tracking.audit import verify as verify_run
    from tracking.errors import IntegrityError

    if clean and source.strip().startswith("models:/"):
        refuse_one_model("verify --clean", "removes the leftovers of a whole run", source)
    removed = clean_leftovers(source, running=force) if clean else []
    report = verify_run(source)
    failures = report.failures
    failed = (
        IntegrityError(f"{len(failures)} of {plural(len(report), 'file')} failed: {next(iter(failures.values()))}")
        if failures
        else None
    )
    if as_json:
        emit_json(
            {
                "run_id": report.run_id,
                "model_id": report.model_id,  # the checkpoint a models:/ RUN names; null: the whole run
                "checked": report.checked,
                "files": dict(report),
                "leftovers": [str(leftover) for leftover in report.leftovers],
                "removed": removed,
                "intact": not failures,
                # The error object a failing --json command prints, in the report rather than after it.
                **(json_error(one_line(failed), 1, failed) if failed else {}),
            }
        )
    else:
        for item in removed:
            echo(f"REMOVED {item}")
        if clean:
            echo(f"{plural(len(removed), 'leftover')} removed")
        for path, problem in report.items():
            echo(f"ok  {path}" if problem is None else f"BAD {path}\n    {problem}")
        for leftover in report.leftovers:
            echo(f"LEFTOVER {leftover}")
        if not failures:
            echo(
                f"{report.checked}: {plural(len(report), 'file')} intact" if report else f"{source}: nothing to verify"
            )
        if report.leftovers:
            them = agree(len(report.leftovers), "it", "them")
            unfinished = sum(leftover.kind == UNFINISHED_DELETION for leftover in report.leftovers)
            finishing = f", finishing {agree(unfinished, 'the deletion', 'the deletions')}" if unfinished else ""
            echo(
                f"{plural(len(report.leftovers), 'leftover')}; `tracking verify --clean {source}` removes {them}"
                f"{finishing}"
            )
    if failed is not None:
        raise failed


COMMANDS = (runs, checkpoints, show, verify)
