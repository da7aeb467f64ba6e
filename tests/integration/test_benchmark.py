"""The checkpoint I/O benchmark, in --quick mode: it runs end to end and reports every contender and ratio.

Timings are not asserted here (they depend on the machine); the full run's targets are in its table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.checkpoint_io import CONTENDERS, METRICS, TARGETS
from tracking.localstack import LocalStack

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.checkpoint_io", "--quick", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def assert_complete(results: dict[str, Any], sizes: list[str]) -> None:
    assert results["contenders"] == list(CONTENDERS)
    assert [size["label"] for size in results["sizes"]] == sizes
    for size in results["sizes"]:
        assert size["checkpoint_bytes"] > 0
        assert set(size["medians_s"]) == set(METRICS)
        assert all(len(size["samples_s"][metric]) == results["meta"]["rounds"] for metric in METRICS)
        assert set(size["ratios"]) == {target.name for target in TARGETS}
        for ratio in size["ratios"].values():
            assert math.isfinite(ratio["value"]) and ratio["value"] > 0
            assert isinstance(ratio["pass"], bool)
    assert [m["label"] for m in results["memory"]] == sizes
    for memory in results["memory"]:
        for contender in ("ours", "boto3"):
            assert memory[contender]["checkpoint_bytes"] > 0
            assert math.isfinite(memory[contender]["ratio"])
    assert isinstance(results["memory_not_growing"]["pass"], bool)
    # The reader figure: ours against one get_object on moto's server and on SeaweedFS (not timed here).
    assert [figure["server"] for figure in results["reader"]] == ["moto server", "SeaweedFS"]
    for figure in results["reader"]:
        assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0 and isinstance(figure["pass"], bool)
        assert len(figure["reads"]) == results["meta"]["rounds"] + 1
    assert results["fixed_cost"]["median_ms"] > 0
    resolution = results["resolution"]
    many = str(resolution["checkpoints"])
    for which in ("latest", "best"):
        for n in ("1", many):
            counts = resolution["requests"][which][n]
            assert counts["s3"] > 0 and counts["tracking"] > 0


def test_quick_run_against_a_running_stack(
    stack_sqlite: LocalStack, use_stack: Callable[[LocalStack], LocalStack], tmp_path: Path
) -> None:
    stack = use_stack(stack_sqlite)
    output = tmp_path / "results.json"
    done = run_benchmark(stack.env(), "--use-env", "--master-url", stack.master_url, "--output", str(output))

    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert_complete(results, ["4MB", "40MB"])
    assert results["meta"]["stack_started_here"] is False
    assert "ratios of medians" in done.stdout and "reader:" in done.stdout
    assert all(s.alive for s in stack.status().services)  # a reused stack is left running


def test_quick_run_starts_and_stops_its_own_stack(new_stack: Callable[..., LocalStack], tmp_path: Path) -> None:
    stack = new_stack("bench")  # not started: the benchmark starts it on these ports and folder
    output = tmp_path / "results.json"
    where = ["--data-dir", str(stack.data_dir), "--s3-port", str(stack.s3_port)]

    done = run_benchmark({}, *where, "--mlflow-port", str(stack.mlflow_port), "--sizes", "4MB", "--output", str(output))

    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert_complete(results, ["4MB"])
    assert results["meta"]["stack_started_here"] is True
    assert not any(s.alive for s in stack.status().services)
