"""The Hugging Face Trainer overhead benchmark in its --smoke mode: every figure is produced (they mean nothing
at these sizes; README's come from a full run against the local stack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a benchmark's, not the library's: make test-all runs it
def test_the_smoke_run_produces_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "hf.json"
    # Its own moto server and sqlite store: no stack from the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.hf_overhead", "--smoke", "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    seed, large = results["seed"], results["large"]
    assert seed["files"] >= 6 and seed["bytes"] > 0
    for mode in ("async", "sync"):
        assert all(seed[mode][k] > 0 for k in ("on_save_ms", "commit_ms", "hf_save_ms")), seed
    # The loop waits for the staging alone; a synchronous commit waits for the upload too.
    assert seed["async"]["on_save_ms"] < seed["sync"]["on_save_ms"]
    assert large["bytes"] > 2**20 and large["upload_s"] > 0 and large["checkpoints"] == 2
    assert "added/upload" in large and large["on_save/upload"] > 0
    assert "loop time added" in done.stdout
