"""What the benchmark reports: its metrics, the targets they are judged against, the verdicts, the tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = {
    "floor_put": "floor: PUT of the pre-serialized bytes",
    "floor_get": "floor: GET into a preallocated buffer",
    "floor_load": "floor: GET + torch.load + load_state_dict",
    "boto3_save": "raw boto3: torch.save to BytesIO + upload_fileobj",
    "boto3_load": "raw boto3: download_fileobj + torch.load + load_state_dict",
    "mlflow_save": "naive MLflow: torch.save to a file + log_artifact",
    "mlflow_load": "naive MLflow: download_artifacts + torch.load + load_state_dict",
    "ours_save": "ours: log_checkpoint (sync)",
    "ours_load": "ours: tracking.load to a ready model + optimizer",
    "async_blocked": "ours async: training loop blocked",
    "async_durable": "ours async: until committed",
}


@dataclass(frozen=True)
class Target:
    """One ratio of medians with its bound: value <= bound passes."""

    name: str
    label: str
    numerator: str
    denominator: str
    bound: float


TARGETS = (
    Target("save_vs_boto3", "save, ours / raw boto3", "ours_save", "boto3_save", 0.85),
    Target("save_vs_mlflow", "save, ours / naive MLflow", "ours_save", "mlflow_save", 0.85),
    Target("save_vs_floor", "save, ours / floor PUT", "ours_save", "floor_put", 1.3),
    Target("load_vs_boto3", "load, ours / raw boto3", "ours_load", "boto3_load", 0.85),
    Target("load_vs_mlflow", "load, ours / naive MLflow", "ours_load", "mlflow_load", 0.8),
    Target("load_vs_floor", "load, ours / (floor GET + torch.load)", "ours_load", "floor_load", 1.3),
    Target("async_blocked", "async save: blocked / sync save", "async_blocked", "ours_save", 0.15),
    Target("async_durable", "async save: until durable / sync save", "async_durable", "ours_save", 1.2),
)
# Targets are judged on these sizes and up; smaller checkpoints are dominated by fixed costs.
TARGET_MIN_BYTES = 512 * 2**20
MEMORY_BOUND = 0.35
FIXED_COST_BOUND_MS = 50.0


def ratios(medians: Mapping[str, float], judged: bool) -> dict[str, dict[str, Any]]:
    """Every target's ratio of medians for one size, with its verdict."""
    out: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        value = medians[target.numerator] / medians[target.denominator]
        out[target.name] = {
            "label": target.label,
            "value": value,
            "bound": target.bound,
            "judged": judged,
            "pass": value <= target.bound,
        }
    return out


def memory_flatness(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat: at the largest size a save grows RSS by at most 1.5x (+ 32 MiB of noise) what it
    grows at the next size down, though the checkpoint is several times larger."""
    pool = sorted(memory, key=lambda m: m["target_bytes"])
    if len(pool) < 2:
        return {"pass": True, "judged": False, "detail": "one size only"}
    small, large = pool[-2]["ours"]["growth_bytes"], pool[-1]["ours"]["growth_bytes"]
    return {
        "pass": large <= 1.5 * small + 32 * 2**20,
        "judged": pool[-2]["judged"],
        "detail": f"{pool[-2]['label']} {small / 2**20:.1f} MiB -> {pool[-1]['label']} {large / 2**20:.1f} MiB",
        "growth_bytes": [small, large],
    }


def write_results(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def print_tables(results: Mapping[str, Any]) -> None:
    """The medians, the ratios with their verdicts, and the fixed costs, as the README shows them."""
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
    console = Console(width=max(Console().width, 130))
    sizes = results["sizes"]
    medians = Table(title="checkpoint I/O: median seconds (lower is better)")
    medians.add_column("what")
    for size in sizes:
        medians.add_column(f"{size['label']} ({size['checkpoint_bytes'] / 2**20:.0f} MiB)", justify="right")
    for metric, label in METRICS.items():
        medians.add_row(label, *(f"{size['medians_s'][metric]:.3f}" for size in sizes))
    console.print(medians)

    targets = Table(title="ratios of medians (targets judged at 512 MiB and up)")
    targets.add_column("ratio")
    targets.add_column("target", justify="right")
    for size in sizes:
        targets.add_column(size["label"], justify="right")
    for target in TARGETS:
        cells = [_verdict(size["ratios"][target.name]) for size in sizes]
        targets.add_row(target.label, f"<= {target.bound}", *cells)
    memory = {m["label"]: m for m in results["memory"]}
    cells = []
    for size in sizes:
        m = memory.get(size["label"])
        if m is None:
            cells.append("-")
            continue
        verdict = _mark(m["pass"], m["judged"])
        cells.append(f"{m['ours']['ratio']:.3f} {verdict} (boto3 {m['boto3']['ratio']:.2f})")
    targets.add_row("save peak RSS growth / bytes, ours", f"<= {MEMORY_BOUND}", *cells)
    flat = results["memory_not_growing"]
    targets.add_row(
        "save peak RSS growth not growing with size",
        "flat",
        *([""] * (len(sizes) - 1)),
        f"{flat['detail']} {_mark(flat['pass'], flat['judged'])}",
    )
    console.print(targets)

    fixed = results["fixed_cost"]
    resolution = results["resolution"]
    singles = Table(title="fixed costs")
    singles.add_column("what")
    singles.add_column("target")
    singles.add_column("measured")
    singles.add_row(
        "seed model: one sync checkpoint (median)",
        f"<= {FIXED_COST_BOUND_MS:.0f} ms",
        f"{fixed['median_ms']:.1f} ms {_mark(fixed['pass'], True)}",
    )
    for which, by_n in resolution["requests"].items():
        described = ", ".join(f"{n}: {c['s3']} S3 + {c['tracking']} tracking" for n, c in by_n.items())
        singles.add_row(
            f"requests to load {which!r}, 1 vs {resolution['checkpoints']} checkpoints",
            "same",
            f"{described} {_mark(by_n['1'] == by_n[str(resolution['checkpoints'])], True)}",
        )
    console.print(singles)
    console.print(f"results: {results['output']}  (total {results['meta']['seconds']:.0f}s)")


def _verdict(ratio: Mapping[str, Any]) -> str:
    return f"{ratio['value']:.3f} {_mark(ratio['pass'], ratio['judged'])}"


def _mark(passed: bool, judged: bool) -> str:
    if not judged:
        return "(info)"
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def print_reader(reader: list[dict[str, Any]]) -> None:
    """Ours against one streamed get_object, server by server."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(title="reader: tracking's S3 read / one streamed get_object, same object, same server")
    for column in ("server", "object", "ours (s)", "one get_object (s)", "ratio", "target", "ranged GETs"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for figure in reader:
        threads = sorted({read["fanned_out"] for read in figure["reads"]})
        table.add_row(
            figure["server"],
            f"{figure['bytes'] / 2**20:.0f} MiB",
            f"{figure['medians_s']['ours']:.3f}",
            f"{figure['medians_s']['get_object']:.3f}",
            f"{figure['ratio']:.2f} {_mark(figure['pass'], True)}",
            f"<= {figure['bound']}",
            "none (one stream)" if threads == [0] else f"{threads} threads beside the stream",
        )
    console.print(table)
