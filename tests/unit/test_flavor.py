"""MLflow's pytorch flavor comes without its Lightning autologging (seconds a process where Lightning is in)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tracking

PROBE = """
import sys
from tracking.flavor import pytorch_flavor

flavor = pytorch_flavor()
assert callable(flavor.log_model) and callable(flavor.load_model)
assert "pytorch_lightning" not in sys.modules and "transformers" not in sys.modules, "autologging was imported"
import importlib.util
# mlflow.pytorch.autolog() imports it when called: it must still be found (a None left in sys.modules would
# make that import fail, and find_spec raise).
assert importlib.util.find_spec("mlflow.pytorch._lightning_autolog") is not None
"""


def test_the_flavor_leaves_lightning_autologging_out_until_asked_for() -> None:
    import lightning  # noqa: F401  # installed (dev extras): without it the probe proves nothing

    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_library_imports_the_flavor_only_through_that_module() -> None:
    root = Path(tracking.__file__).parent
    direct = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "flavor.py"
        and re.search(r"^\s*(import mlflow\.pytorch|from mlflow\.pytorch)", path.read_text(), re.M)
    ]
    assert direct == []
