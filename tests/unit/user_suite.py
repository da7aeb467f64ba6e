"""A user's own test files run as the user runs them: a child pytest whose only plugin is ``tracking.testing``."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ONLY_THE_PLUGIN = 'pytest_plugins = ["tracking.testing"]\n'


def run_user_suite(
    home: Path, files: Mapping[str, str], conftest: str = ONLY_THE_PLUGIN, env: Mapping[str, str] | None = None
) -> tuple[dict[str, str], str]:
    """Write ``conftest`` and ``files`` (name: source) into ``home`` and run pytest there, with ``env`` over ours.

    Returns each test's outcome by name ("passed", or its failures and errors) and the end of pytest's output.
    """
    (home / "conftest.py").write_text(conftest)
    for name, source in files.items():
        (home / name).write_text(source)
    report = home / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(home)],
        cwd=home,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert report.exists(), output
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        problems = [f"{p.tag}: {p.get('message')}\n{p.text}" for p in case if p.tag in ("failure", "error")]
        outcomes[case.get("name", "")] = "\n".join(problems) or "passed"
    return outcomes, output
