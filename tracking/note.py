"""The run's description in the MLflow UI (its note, rendered as markdown on the run page).

It says what was trained, lists the run's checkpoints with their metrics and which is latest
and best, and gives the exact lines to load, evaluate and resume this run. The
:class:`~tracking.Checkpointer` rewrites it with every checkpoint, in the same request that
moves the run's pointer tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# MLflow's tag for a run's description.
NOTE_TAG = "mlflow.note.content"
# Metric columns in the checkpoint table: the monitored one first, then by name, at most this many.
_METRIC_COLUMNS = 4


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
) -> str:
    """The markdown description of run ``run_id`` with ``checkpoints`` (by epoch)."""
    trained = f"`{model_class}`" + (f" with `{optimizer_class}`" if optimizer_class else "")
    lines = [
        f"Training run of {trained}. Each checkpoint is a logged model of this run (the run's "
        "*Logged models*, the experiment's *Models* tab): register one there, or with `tracking register`.",
        "",
    ]
    if checkpoints:
        names = sorted({name for c in checkpoints.values() for name in c.metrics}, key=lambda n: (n != monitor, n))
        shown = names[:_METRIC_COLUMNS]
        lines += [
            "| epoch | model ID | " + " | ".join(shown) + " | |",
            "|---|---|" + "---|" * len(shown) + "---|",
        ]
        for epoch in sorted(checkpoints, reverse=True):
            checkpoint = checkpoints[epoch]
            values = [f"{checkpoint.metrics[n]:.4g}" if n in checkpoint.metrics else "" for n in shown]
            marks = ", ".join(mark for mark, e in (("latest", latest), ("best", best)) if e == epoch)
            lines.append(f"| {epoch} | `{checkpoint.model_id}` | " + " | ".join(values) + f" | {marks} |")
        lines.append("")
    pinned = checkpoints[latest].model_id if latest is not None and latest in checkpoints else None
    python = [
        "import tracking",
        f'loaded = tracking.load("{run_id}")  # latest: loaded.model, loaded.optimizer, loaded.epoch',
        f'best = tracking.load("{run_id}", "best", mode="train")  # ready to resume',
    ]
    if pinned:
        python.append(f'model = tracking.load_model("models:/{pinned}")  # exactly epoch {latest}')
    shell = [f"tracking checkpoints {run_id}", f"tracking show {run_id} --checkpoint best", *commands]
    lines += ["**Load it**", "", "```python", *python, "```", "", "```bash", *shell, "```"]
    return "\n".join(lines)
