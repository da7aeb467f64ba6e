"""The GPU benchmark's steps, run on the CPU with tiny sizes (``--smoke``): every figure is produced.

Its real figures need a CUDA device (README, "Benchmark"); without one, a plain run says it skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_gpu_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    # Its own moto server and sqlite store: no stack from the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.checkpoint_io.gpu", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # a benchmark's, not the library's: make test-all runs it
def test_every_step_runs_and_reports_its_ratio(tmp_path: Path) -> None:
    output = tmp_path / "gpu.json"
    done = run_gpu_benchmark("--smoke", "--rounds", "1", "--output", str(output))
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    save, load = results["save"], results["load"]
    assert save["bytes"] > 0 and save["floor_s"] > 0
    for name in ("cold_first/floor", "reserved_first/floor", "later/floor"):
        assert save["ratios"][name] > 0, name
    for store in ("s3", "local"):
        assert load[store]["ours_s"] > 0 and load[store]["ratio"] > 0, store
    assert "async save of" in done.stdout and "load of" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the plain run measures (tests/gpu's machine)")
def test_without_cuda_a_plain_run_says_it_skipped(tmp_path: Path) -> None:
    done = run_gpu_benchmark("--output", str(tmp_path / "gpu.json"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("GPU benchmark skipped: no CUDA device here")
    assert not (tmp_path / "gpu.json").exists()
