"""docker/compose.yaml as Docker Compose reads it: variable interpolation, services, commands, environments.

Only what the tests need, but with Compose's semantics: ``$$`` is a literal ``$``; ``$VAR`` and
``${VAR}`` are the variable's value (empty when unset); ``${VAR:-default}`` / ``${VAR-default}`` give
the default when the variable is unset or empty / unset; ``${VAR:?message}`` / ``${VAR?message}``
fail the same way; ``${VAR:+other}`` / ``${VAR+other}`` give ``other`` when it is set and non-empty /
set. Defaults may themselves hold ``${...}``. Interpolation applies to every string value of the
parsed file (not to keys, nor to comments); a string ``command`` is then split into words the way a
shell would, without running one.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Longest operators first: ":-" must not be read as "-" after a name ending in ":".
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """Compose would refuse the file: a malformed ``${...}`` or a ``${VAR?message}`` that fires."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every variable reference replaced as Compose does, reading values from ``env``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        elif match := _NAME.match(text, i + 1):
            out.append(env.get(match.group(), ""))
            i = match.end()
        else:
            raise InterpolationError(f"invalid interpolation format at offset {i} of {text!r}")
    return "".join(out)


def variables(text: str) -> set[str]:
    """The names of the variables ``text`` refers to, defaults included (``$$NAME`` is not one)."""
    seen = _Recorder()
    interpolate(text, seen)
    return seen.names


def defaults(text: str) -> dict[str, set[str]]:
    """For each variable of ``text`` used with ``:-`` or ``-``, the defaults it is given."""
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):?-", text):
        end = _closing_brace(text, match.start() + 2)
        found.setdefault(match.group(1), set()).add(text[match.end() : end])
    return found


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def _expand(body: str, env: Mapping[str, str]) -> str:
    match = _NAME.match(body)
    if match is None:
        raise InterpolationError(f"invalid variable name in ${{{body}}}")
    name, rest = match.group(), body[match.end() :]
    if not rest:
        return env.get(name, "")
    operator = next((op for op in _OPERATORS if rest.startswith(op)), None)
    if operator is None:
        raise InterpolationError(f"invalid interpolation format in ${{{body}}}")
    argument = interpolate(rest[len(operator) :], env)  # always: so variables() sees nested names
    value = env.get(name)
    present = value is not None and (value != "" or ":" not in operator)
    if operator in (":-", "-"):
        return value if present and value is not None else argument
    if operator in (":?", "?"):
        if not present or value is None:
            raise InterpolationError(f"required variable {name} is missing a value: {argument}")
        return value
    return argument if present else ""


class _Recorder(dict[str, str]):
    """An empty environment that remembers which names were looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.names.add(key)
        return default


def read_text() -> str:
    return COMPOSE_FILE.read_text()


def load(env: Mapping[str, str] | None = None, text: str | None = None) -> dict[str, Any]:
    """The parsed compose file (YAML anchors and merge keys resolved), interpolated with ``env`` when given.

    ``text`` replaces the file's own text (a variant of it, see :func:`proxied_artifacts_variant`).
    """
    tree = yaml.safe_load(read_text() if text is None else text)
    assert isinstance(tree, dict), f"{COMPOSE_FILE} is not a mapping"
    return tree if env is None else _interpolate_tree(tree, env)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(value, env) for value in node]
    return node


def referenced_variables() -> set[str]:
    """Every variable the compose file interpolates, in any string value."""
    names: set[str] = set()
    for text in _strings(yaml.safe_load(read_text())):
        names |= variables(text)
    return names


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [text for value in node.values() for text in _strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in _strings(value)]
    return []


def command(service: Mapping[str, Any]) -> list[str]:
    """An (interpolated) service's command as the argument list the container gets."""
    value = service["command"]
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """An (interpolated) service's environment; a variable given without a value comes from ``env``."""
    value = service.get("environment") or {}
    items: list[tuple[str, Any]]
    if isinstance(value, list):
        items = [(entry.partition("=")[0], entry.partition("=")[2] if "=" in entry else None) for entry in value]
    else:
        items = list(value.items())
    out: dict[str, str] = {}
    for key, raw in items:
        if raw is None:
            if key in env:
                out[key] = env[key]
        else:
            out[key] = str(raw).lower() if isinstance(raw, bool) else str(raw)
    return out


def env_example() -> dict[str, str]:
    """``docker/.env.example``'s variables and values (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{ENV_EXAMPLE}: {line!r} is not KEY=VALUE"
        values[key.strip()] = value.strip()
    return values


def proxied_artifacts_variant() -> str:
    """The compose file with the one-line change its mlflow service's comment offers for proxied artifacts.

    The comment names a line (``#   --serve-artifacts ...``) to put in place of the last line of the
    service's command; that is done here, on the text, exactly as a user would edit it.
    """
    lines = read_text().splitlines(keepends=True)
    offered = [line for line in lines if re.match(r"\s*#\s+--serve-artifacts\b", line)]
    assert len(offered) == 1, f"expected one commented --serve-artifacts line in {COMPOSE_FILE}, found {offered}"
    start = next(i for i, line in enumerate(lines) if re.match(r"  mlflow:$", line))
    command = next(i for i in range(start, len(lines)) if lines[i].startswith("    command: >-"))
    last = command
    while last + 1 < len(lines) and lines[last + 1].startswith("      "):
        last += 1
    assert last > command, f"the mlflow command in {COMPOSE_FILE} is not a folded block of lines"
    indent = lines[last][: len(lines[last]) - len(lines[last].lstrip())]
    lines[last] = indent + offered[0].split("#", 1)[1].strip() + "\n"
    return "".join(lines)
