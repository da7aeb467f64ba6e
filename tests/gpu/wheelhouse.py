"""The GPU machine's missing wheels (``wheelhouse.txt``), pinned to the versions installed here.

    python -m tests.gpu.wheelhouse pins          # name==version per line, for ``pip download``
    python -m tests.gpu.wheelhouse check DIR     # DIR holds exactly one wheel of each, for Python 3.12,
                                                 # and nothing they require is missing from both parts

``make wheelhouse`` runs both; ``tests/gpu/device_check.sh`` installs what it fetched.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

NAMES_FILE = Path(__file__).with_name("wheelhouse.txt")
# The GPU machine's interpreter: a compiled wheel must be built for it (or for the stable ABI).
PYTHON_TAGS = {"py3", "py2.py3", "cp312"}


IMAGE_SECTION = "[on the GPU image]"
# Where requirement markers are evaluated: the GPU machine's interpreter and platform.
GPU_MACHINE = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
}
# The extras the project installs (pyproject.toml: moto[s3]).
EXTRAS = {"moto": {"s3"}}


def _sections() -> tuple[list[str], list[str]]:
    fetched: list[str] = []
    image: list[str] = []
    current = fetched
    for raw in NAMES_FILE.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line == IMAGE_SECTION:
            current = image
        elif line:
            current.append(line)
    return fetched, image


def names() -> list[str]:
    """The packages to fetch."""
    return _sections()[0]


def unmet() -> list[str]:
    """Requirements of the fetched packages (as installed here) that are neither fetched nor on the GPU image."""
    fetched, image = _sections()
    known = {canonicalize_name(name) for name in fetched + image}
    problems = []
    for name in fetched:
        extras = EXTRAS.get(canonicalize_name(name), set())
        for text in distribution(name).requires or []:
            requirement = Requirement(text)
            needed = requirement.marker is None or any(
                requirement.marker.evaluate({**GPU_MACHINE, "extra": extra}) for extra in ["", *sorted(extras)]
            )
            if needed and canonicalize_name(requirement.name) not in known:
                problems.append(f"{requirement.name}: required by {name}, neither fetched nor on the GPU image")
    return problems


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
    a wheel built for another Python, a requirement nobody provides."""
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
    return problems + unmet()


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
            print(
                f"{folder}: incomplete; add what is missing to {NAMES_FILE} (the first part, or the image's if the "
                "GPU machine has it) and run `make wheelhouse` again",
                file=sys.stderr,
            )
            return 1
        wheels = list(folder.glob("*.whl"))
        size = sum(wheel.stat().st_size for wheel in wheels)
        print(f"{folder}: {len(wheels)} wheels, {size / 2**20:.1f} MiB")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
