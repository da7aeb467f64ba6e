"""The run's description in the MLflow UI (its note, rendered as markdown on the run page).

It says what was trained, lists the run's checkpoints with their metrics and which is latest
and best, and gives the exact lines to load, evaluate and resume this run. The
:class:`~tracking.Checkpointer` rewrites it with every checkpoint, in the same request that
moves the run's pointer tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracking import layout

if TYPE_CHECKING:
    from tracking.manifest import Manifest

# MLflow's tag for a run's description.
NOTE_TAG = "mlflow.note.content"
# Metric columns in the checkpoint table: the monitored one first, then by name, at most this many.
_METRIC_COLUMNS = 4
# MLflow stores the description as a run tag, whose values it cuts at this many characters.
MAX_CHARS = 8000
# How a description render() wrote begins, and the heading its checkpoint table ends at.
_INTRO = "Training run of "
_LOAD_IT = "**Load it**"


@dataclass(frozen=True)
class NotedCheckpoint:
    model_id: str
    metrics: Mapping[str, float]


def render(
    run_id: str,
    *,
    model_class: str,
    optimizer_class: str | None,
    checkpoints: Mapping[int, NotedCheckpoint],
    latest: int | None,
    best: int | None,
    monitor: str | None,
    commands: Sequence[str] = (),
    python: Sequence[str] = (),
    keyed_by: str = layout.EPOCH,
    optimizers: Mapping[str, str] | None = None,
) -> str:
    """The markdown description of run ``run_id`` with ``checkpoints`` (by key: epoch, or step when ``keyed_by``
    says so); ``python`` adds lines to its Python block (a framework's own way to resume, say), ``commands`` to
    its shell block. ``optimizers``: the classes of several optimizers by name, in place of ``optimizer_class``."""
    trained = f"`{model_class}`" + (f" with `{optimizer_class}`" if optimizer_class else "")
    optimizer_attribute = "loaded.optimizer"
    if optimizers:
        each = ", ".join(f"`{name}` (`{cls}`)" for name, cls in sorted(optimizers.items()))
        trained = f"`{model_class}` with the optimizers {each}"
        optimizer_attribute = f"loaded.optimizers[{min(optimizers)!r}]"
    lines = [
        f"{_INTRO}{trained}. Each checkpoint is a logged model of this run (the run's "
        "*Logged models*, the experiment's *Models* tab): register one there, or with `tracking register`.",
        "",
    ]
    pinned = checkpoints[latest].model_id if latest is not None and latest in checkpoints else None
    code = [
        "import tracking",
        f'loaded = tracking.load("{run_id}")  # latest: loaded.model, {optimizer_attribute}, loaded.epoch',
        f'best = tracking.load("{run_id}", "best", mode="train")  # ready to resume',
    ]
    if pinned:
        code.append(f'model = tracking.load_model("models:/{pinned}")  # exactly {layout.label(keyed_by, latest)}')
    code += python
    shell = [f"tracking checkpoints {run_id}", f"tracking show {run_id} --checkpoint best", *commands]
    load_it = [_LOAD_IT, "", "```python", *code, "```", "", "```bash", *shell, "```"]
    if checkpoints:
        budget = MAX_CHARS - len("\n".join(lines + load_it))
        lines += _table(run_id, checkpoints, latest, best, monitor, budget, keyed_by)
    return "\n".join(lines + load_it)


def describe_run(
    run_id: str,
    manifest: Manifest,
    checkpoints: Mapping[int, NotedCheckpoint],
    tags: Mapping[str, str],
    *,
    monitor: str | None,
    commands: Sequence[str] = (),
    python: Sequence[str] = (),
) -> dict[str, str]:
    """The run's description tag for a checkpoint being committed: ``checkpoints`` are the run's as they will be
    (by key, the new one among them), ``tags`` its tags as they will be (latest, best); ``{run_id}`` in a
    command is replaced by the run's ID."""
    by_model = {c.model_id: key for key, c in checkpoints.items()}
    text = render(
        run_id,
        model_class=str(manifest.model.get("class")),
        optimizer_class=(manifest.optimizer or {}).get("class"),
        optimizers={name: str(d.get("class")) for name, d in (manifest.optimizers or {}).items()} or None,
        checkpoints=checkpoints,
        latest=by_model.get(tags.get(layout.TAG_LATEST, "")),
        best=by_model.get(tags.get(layout.TAG_BEST, "")),
        monitor=monitor,
        commands=[c.replace("{run_id}", run_id) for c in commands],
        python=python,
        keyed_by=manifest.keyed_by,
    )
    return {NOTE_TAG: text}


def relist(
    text: str,
    run_id: str,
    checkpoints: Mapping[int, NotedCheckpoint],
    tags: Mapping[str, str],
    *,
    monitor: str | None,
    keyed_by: str,
) -> str | None:
    """``text``, a run's description as :func:`render` wrote it, with its checkpoint table listing ``checkpoints``
    (by key) marked by ``tags`` (latest, best), the rest as it was; None when ``text`` is not such a description
    (one a user wrote or edited around the table is theirs: left alone)."""
    intro, blank, rest = text.partition("\n\n")
    table, heading, load_it = rest.partition(_LOAD_IT)
    if not (intro.startswith(_INTRO) and "\n" not in intro and blank and heading):
        return None
    if any(line and not line.startswith(("|", "*")) for line in table.splitlines()):
        return None
    by_model = {c.model_id: key for key, c in checkpoints.items()}
    latest = by_model.get(tags.get(layout.TAG_LATEST, ""))
    best = by_model.get(tags.get(layout.TAG_BEST, ""))
    kept = heading + load_it
    rows = _table(run_id, checkpoints, latest, best, monitor, MAX_CHARS - len(intro) - 2 - len(kept), keyed_by)
    return "\n".join([intro, "", *(rows if checkpoints else [])]) + "\n" + kept


def _table(
    run_id: str,
    checkpoints: Mapping[int, NotedCheckpoint],
    latest: int | None,
    best: int | None,
    monitor: str | None,
    budget: int,
    keyed_by: str,
) -> list[str]:
    """The checkpoint table in at most ``budget`` characters (newlines included), newest first.

    When every row does not fit, latest and best stay, then the newest others, and one line says
    how many are left out and where they are all listed.
    """
    names = sorted({name for c in checkpoints.values() for name in c.metrics}, key=lambda n: (n != monitor, n))
    shown = names[:_METRIC_COLUMNS]
    header = [
        f"| {keyed_by} | model ID | " + " | ".join(shown) + " | |",
        "|---|---|" + "---|" * len(shown) + "---|",
    ]
    rows = {}
    for epoch, checkpoint in checkpoints.items():
        values = [f"{checkpoint.metrics[n]:.4g}" if n in checkpoint.metrics else "" for n in shown]
        marks = ", ".join(mark for mark, e in (("latest", latest), ("best", best)) if e == epoch)
        rows[epoch] = f"| {epoch} | `{checkpoint.model_id}` | " + " | ".join(values) + f" | {marks} |"
    used = sum(len(line) + 1 for line in header) + 1  # the blank line after the table
    if used + sum(len(row) + 1 for row in rows.values()) <= budget:
        return [*header, *(rows[e] for e in sorted(rows, reverse=True)), ""]
    # Room for the line saying what is left out (after a blank line, or markdown would read it as a row).
    used += len(_left_out(run_id, len(rows))) + 2
    order = [e for e in (latest, best) if e in rows] + sorted(rows, reverse=True)
    kept: set[int] = set()
    for epoch in order:
        if epoch not in kept and used + len(rows[epoch]) + 1 <= budget:
            kept.add(epoch)
            used += len(rows[epoch]) + 1
    table = [*header, *(rows[e] for e in sorted(kept, reverse=True))]
    return [*table, "", _left_out(run_id, len(rows) - len(kept)), ""]


def _left_out(run_id: str, count: int) -> str:
    return f"*{count} more checkpoints are not shown: `tracking checkpoints {run_id}` lists them all.*"
