"""README's code runs as written: every ```python block of README.md, against the unit tier's stores.

A block is run in a module of its own (registered in ``sys.modules``, as a user's script is as
``__main__``), so that the classes it defines are importable by their recorded class path.
"""

from __future__ import annotations

import re
import sys
import types
import uuid
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return _PYTHON_BLOCK.findall(README.read_text())


def test_readme_has_python_examples() -> None:
    # The extraction itself must find what it is meant to run, or the test below checks nothing.
    blocks = python_blocks()
    assert blocks and "tracking.log_checkpoint(" in blocks[0]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(s3_experiment: str, index: int) -> None:
    code = python_blocks()[index]
    name = f"readme_block_{index}_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(code, f"README.md (python block {index + 1})", "exec"), module.__dict__)
    finally:
        sys.modules.pop(name, None)
