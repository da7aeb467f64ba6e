"""The GPU machine's missing wheels (``wheelhouse.txt``), pinned to the versions installed here.

    python -m tests.gpu.wheelhouse pins          # name==version per line, for ``pip download``
    python -m tests.gpu.wheelhouse check DIR     # DIR holds exactly one wheel of each, for Python 3.12

``make wheelhouse`` runs both; ``tests/gpu/device_check.sh`` installs what it fetched.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

NAMES_FILE = Path(__file__).with_name("wheelhouse.txt")
# The GPU machine's interpreter: a compiled wheel must be built for it (or for the stable ABI).
PYTHON_TAGS = {"py3", "py2.py3", "cp312"}


def names() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in NAMES_FILE.read_text().splitlines())
    return [line for line in lines if line]


def pins() -> list[str]:
    """``name==version`` of each listed package, as installed in this environment."""
    pinned, missing = [], []
    for name in names():
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"{', '.join(missing)} not installed in {sys.prefix}: the wheelhouse pins the versions installed "
            "here; run `make install` first (or drop the name from tests/gpu/wheelhouse.txt)."
        )
    return pinned


def check(folder: Path) -> list[str]:
    """Problems with ``folder``: a listed package without a wheel, two wheels of one, a stray wheel,
    a wheel built for another Python."""
    wanted = {canonicalize_name(pin.split("==")[0]): pin.split("==")[1] for pin in pins()}
    found: dict[str, list[str]] = {}
    problems = []
    for wheel in sorted(folder.glob("*.whl")):
        name, wheel_version, _, tags = parse_wheel_filename(wheel.name)
        found.setdefault(name, []).append(wheel.name)
        if name not in wanted:
            problems.append(f"{wheel.name}: not in {NAMES_FILE.name}")
        elif str(wheel_version) != wanted[name]:
            problems.append(f"{wheel.name}: version {wheel_version}, {wanted[name]} is installed here")
        if not any(tag.interpreter in PYTHON_TAGS or tag.abi == "abi3" for tag in tags):
            problems.append(f"{wheel.name}: not built for CPython 3.12")
    problems += [f"{name}: no wheel" for name in wanted if name not in found]
    problems += [f"{name}: {len(files)} wheels ({', '.join(files)})" for name, files in found.items() if len(files) > 1]
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["pins"]:
        print("\n".join(pins()))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        folder = Path(argv[1])
        problems = check(folder)
        for problem in problems:
            print(f"{folder}: {problem}", file=sys.stderr)
        if problems:
            print(f"{folder}: incomplete; run `make wheelhouse` again", file=sys.stderr)
            return 1
        wheels = list(folder.glob("*.whl"))
        size = sum(wheel.stat().st_size for wheel in wheels)
        print(f"{folder}: {len(wheels)} wheels, {size / 2**20:.1f} MiB")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
