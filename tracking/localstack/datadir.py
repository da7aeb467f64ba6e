"""The local stack's data folder as files: owner-only writes, the last line of a log, the folder's size, and the
``export`` lines of ``stack.env``. What the folder holds is :mod:`tracking.localstack.stack`'s to say.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only: it holds credentials (stack.env, s3.json) or a database URL
    (stack.json)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def last_line(path: Path, containing: str = "") -> str:
    """The last non-blank line of a log (that holds ``containing``), shortened for an error message."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    last = next((line.strip() for line in reversed(lines) if line.strip() and containing in line), "")
    return last if len(last) <= 200 else last[:197] + "..."


def tree_size(path: Path) -> int:
    """The bytes of every file under ``path``, as ``tracking stack status`` shows them."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while walking
    return total


def export_lines(env: Mapping[str, str]) -> str:
    """``export NAME=value`` lines for shells and Makefiles, each value quoted."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())
