"""README's code layout names every module, and its download example writes where git does not look."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n#", start + len(title))
    return README[start : end if end != -1 else None]


def test_the_code_layout_names_every_module() -> None:
    layout = _section("### Code layout")
    named = set(re.findall(r"`([^`]+)`", layout))
    missing = []
    for package in ("tracking", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if path.name in ("__init__.py", "__main__.py"):
                continue
            if len(relative.parts) > 2:  # a subpackage: the table names its folder
                if f"{'/'.join(relative.parts[:2])}/" not in named:
                    missing.append(str(relative))
            elif path.name not in named and str(relative) not in named:
                missing.append(str(relative))
    assert not missing, f"README's code layout table does not name {missing}"


def test_readmes_download_example_writes_into_an_ignored_folder() -> None:
    commands = [line for line in README.splitlines() if line.startswith("tracking download ")]
    assert commands, "README shows no `tracking download` command"
    for command in commands:
        words = shlex.split(command.split("#")[0])
        target = words[words.index("--to") + 1]
        inside = (ROOT / target).resolve()
        if ROOT not in inside.parents:
            continue  # outside the checkout: nothing for git to show
        ignored = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", str(inside.relative_to(ROOT) / "checkpoint.pt")],
            cwd=ROOT,
        )
        assert ignored.returncode == 0, f"`git status` would list {target}/ after README's `{command.strip()}`"


def test_readme_mentions_every_public_name() -> None:
    import tracking

    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", README))
    missing = [name for name in tracking.__all__ if name not in named]
    assert not missing, f"README never mentions {missing}, which `import tracking` offers"


def test_readme_mentions_every_command_and_option() -> None:
    import click

    from tracking.cli import main

    missing = []
    context = click.Context(main)
    for name in main.list_commands(context):
        command = main.get_command(context, name)
        assert command is not None
        commands = {name: command}
        if isinstance(command, click.Group):
            commands.update({f"{name} {sub}": command.commands[sub] for sub in command.commands})
        for label, each in commands.items():
            if f"tracking {label.split()[0]}" not in README:
                missing.append(f"tracking {label}")
            for param in each.params:
                for flag in param.opts if isinstance(param, click.Option) and not param.hidden else ():
                    if flag.startswith("--") and flag not in ("--help",) and not re.search(rf"{flag}\b", README):
                        missing.append(f"tracking {label} {flag}")
    assert not missing, f"README never mentions {missing}"


def test_readme_names_every_fixture_of_the_testing_plugin() -> None:
    source = (ROOT / "tracking" / "testing.py").read_text()
    fixtures = re.findall(r"@pytest\.fixture[^\n]*\ndef ([a-z]\w*)", source)
    assert "tracking_experiment" in fixtures
    missing = [name for name in fixtures if f"`{name}`" not in README]
    assert not missing, f"README's testing section never names the fixtures {missing}"


def test_readme_mentions_every_keyword_of_the_public_functions() -> None:
    import inspect

    import tracking

    missing = []
    for name in tracking.__all__:
        value = getattr(tracking, name)
        if not (inspect.isfunction(value) or value is tracking.Checkpointer) or name == "rebuildable":
            continue
        for parameter in inspect.signature(value).parameters:
            if not re.search(rf"\b{parameter}\b", README):
                missing.append(f"{name}({parameter}=)")
    assert not missing, f"README never mentions {missing}"


def test_what_a_run_stores_names_every_tag_and_checkpoint_format() -> None:
    """The logged models' tracking.format and tracking.format_version tags were missing from the list of what a run
    stores, which named every other tag: a search filter on them had nothing to go by."""
    from tracking import layout, manifest

    stored = _section("## What a run stores")
    tags = [
        value
        for name, value in vars(layout).items()
        if name.startswith(("TAG_", "VERSION_TAG_")) and isinstance(value, str)
    ]
    # A tag of a family is named in full or as its last part after the first: "(and .latest_epoch, ...)".
    missing = [tag for tag in tags if tag not in stored and f".{tag.rsplit('.', 1)[-1]}" not in stored]
    assert not missing, f"README's 'What a run stores' does not name the tags {missing}"
    formats = [fmt for fmt in manifest.FORMATS if fmt != "safetensors"]  # safetensors: the state dict's, no model's
    assert not [fmt for fmt in formats if fmt not in stored.split("tracking.format", 1)[-1]]
