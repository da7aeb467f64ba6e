"""docker/: the production stack's files, checked without a Docker engine.

What the services read, what they are built from and how they depend on each other. The server
command itself is run by tests/integration/test_compose_server.py; the linters (hadolint, dclint)
by ``make lint-docker``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests import compose

ROOT = compose.ROOT
DOCKERFILES = {"mlflow": compose.DOCKER_DIR / "mlflow.Dockerfile", "trainer": compose.DOCKER_DIR / "trainer.Dockerfile"}
CONSTRAINTS = compose.DOCKER_DIR / "constraints.txt"

# Variables read by the programs of the two third-party images, which cannot be searched here.
IMAGE_VARIABLES = {
    # The postgres image's entrypoint creates this user, with this password, and this database.
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    # MinIO's root credentials: the server's, and what minio-init's mc logs in with.
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
}
# Who reads each service's environment: its own program(s).
SERVICE_READERS = {
    "minio": {"minio"},
    "minio-init": {"minio"},
    "postgres": {"postgres"},
    "mlflow": {"mlflow", "boto3"},  # `mlflow server`, and boto3 inside it for the bucket
    "trainer": {"project", "mlflow", "boto3"},  # the pipelines, the library, MLflow's client, boto3
}
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN")
LOCAL_TRIAL = "local-trial-"


@functools.cache
def _source_text(*folders: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for folder in folders for path in sorted(folder.rglob("*.py")))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not installed"
    return Path(spec.origin).parent


def readers(name: str) -> set[str]:
    """Which programs read the variable ``name``: searched in their source where it is at hand."""
    literal = re.compile(rf"['\"]{re.escape(name)}['\"]")
    found = {image for image, names in IMAGE_VARIABLES.items() if name in names}
    if literal.search(_source_text(ROOT / "tracking", ROOT / "pipelines")):
        found.add("project")
    if literal.search(_source_text(_package_dir("mlflow"))):
        found.add("mlflow")
    if literal.search(_source_text(_package_dir("botocore"), _package_dir("boto3"))):
        found.add("boto3")
    return found


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The services with every variable at its default, as a stack with an empty docker/.env gets them."""
    return dict(compose.load({})["services"])


# -- variables ------------------------------------------------------------------------------------


def test_every_variable_the_services_read_is_read_by_their_program(services: dict[str, Any]) -> None:
    unknown = []
    for name, service in services.items():
        for key in compose.environment(service, {}):
            if not readers(key) & SERVICE_READERS[name]:
                unknown.append(f"{name}: {key} (read by {sorted(readers(key)) or 'nothing known'})")
    assert not unknown, "variables no program of their service reads:\n" + "\n".join(unknown)


def test_every_interpolated_variable_is_in_env_example_and_read_by_a_program() -> None:
    referenced = compose.referenced_variables()
    example = compose.env_example()
    assert sorted(referenced - example.keys()) == [], "missing from docker/.env.example"
    assert sorted(example.keys() - referenced) == [], "in docker/.env.example but not used by compose.yaml"
    unread = sorted(name for name in referenced if not readers(name))
    assert unread == [], "interpolated variables no program reads (name them as their program does)"


def test_minio_init_reads_what_it_is_given(services: dict[str, Any]) -> None:
    script = " ".join(services["minio-init"]["entrypoint"])
    for key in compose.environment(services["minio-init"], {}):
        assert f"${key}" in script, key


def test_every_variable_has_one_default_and_env_example_documents_it() -> None:
    text = compose.read_text()
    found = compose.defaults(text)
    assert sorted(compose.referenced_variables() - found.keys()) == [], "without a default (`up` would need .env)"
    several = {name: values for name, values in found.items() if len(values) > 1}
    assert several == {}, "one variable, several defaults"
    example = compose.env_example()
    for name, (default,) in found.items():
        if SECRET.search(name) or name == "MINIO_ROOT_USER":
            assert default.startswith(LOCAL_TRIAL), f"{name}'s default {default!r} is not a clearly local-trial value"
            assert example[name] == "", f"docker/.env.example must not suggest a value for the secret {name}"
        else:
            assert example[name] == default, f"docker/.env.example says {name}={example[name]}, compose.yaml {default}"


def test_secrets_come_only_from_variables() -> None:
    # Each variable interpolated as <ITS NAME>: a secret must be exactly one of those.
    marked = {name: f"<{name}>" for name in compose.referenced_variables()}
    for name, service in compose.load(marked)["services"].items():
        for key, value in compose.environment(service, marked).items():
            if SECRET.search(key) or key == "AWS_ACCESS_KEY_ID":
                assert re.fullmatch(r"<[A-Z_]+>", value), f"{name}: {key} is not taken from a variable"
            password = urlsplit(value).password if "://" in value else None
            if password is not None:
                assert re.fullmatch(r"<[A-Z_]+>", password), f"{name}: {key} holds a literal password"
    for path in DOCKERFILES.values():
        for line in path.read_text().splitlines():
            if line.startswith(("ENV", "ARG")):
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", line), f"{path.name}: {line}"


def test_docker_env_is_git_ignored() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert result.returncode == 0, "docker/.env (secrets) is not git-ignored"


# -- services -------------------------------------------------------------------------------------


def test_images_are_pinned_and_ports_local(raw: dict[str, Any]) -> None:
    for name, service in raw["services"].items():
        assert ("image" in service) != ("build" in service), f"{name}: image or build, exactly one"
        if "image" in service:
            _, _, tag = service["image"].rpartition(":")
            assert tag != "latest" and re.search(r"\d", tag), f"{name}: {service['image']} is not a version"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond this machine"


def test_healthchecks_and_dependency_conditions(raw: dict[str, Any]) -> None:
    services = raw["services"]
    one_shot = {name for name, s in services.items() if s.get("healthcheck", {}).get("disable")}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if name in one_shot:
            assert "restart" not in service, f"{name}: a one-shot job must not restart"
        else:
            assert check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name}: {check}"
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, how in depends.items():
            wanted = "service_completed_successfully" if target in one_shot else "service_healthy"
            assert how == {"condition": wanted}, f"{name} -> {target}: {how}, expected {wanted}"
    long_running = {name for name, s in services.items() if name not in one_shot and "profiles" not in s}
    assert all(services[name].get("restart") == "unless-stopped" for name in long_running)


def test_volumes_are_named(raw: dict[str, Any]) -> None:
    declared = set(raw.get("volumes") or {})
    used = set()
    for name, service in raw["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert source in declared, f"{name}: {volume} is not a named volume"
            used.add(source)
    assert used == declared


def test_endpoints_agree(services: dict[str, Any]) -> None:
    server = compose.command(services["mlflow"])
    port = server[server.index("--port") + 1]
    assert services["mlflow"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"127.0.0.1:{port}/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    trainer = compose.environment(services["trainer"], {})
    assert trainer["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
    allowed = server[server.index("--allowed-hosts") + 1].split(",")
    assert f"mlflow:{port}" in allowed and "localhost:*" in allowed
    s3 = urlsplit(trainer["MLFLOW_S3_ENDPOINT_URL"])
    assert compose.environment(services["mlflow"], {})["MLFLOW_S3_ENDPOINT_URL"] == s3.geturl()
    assert f"127.0.0.1:{s3.port}:{s3.port}" in services["minio"]["ports"]
    assert f"http://minio:{s3.port}" in " ".join(services["minio-init"]["entrypoint"])


def test_server_runs_in_readmes_mode_and_the_other_is_one_line_away(services: dict[str, Any]) -> None:
    declared = compose.command(services["mlflow"])
    assert "--no-serve-artifacts" in declared
    assert declared[declared.index("--default-artifact-root") + 1] == "s3://mlflow/mlartifacts"
    variant = compose.proxied_artifacts_variant()
    changed = [(a, b) for a, b in zip(compose.read_text().splitlines(), variant.splitlines(), strict=True) if a != b]
    assert len(changed) == 1
    proxied = compose.command(compose.load({}, text=variant)["services"]["mlflow"])
    assert "--serve-artifacts" in proxied and "--default-artifact-root" not in proxied
    assert proxied[proxied.index("--artifacts-destination") + 1] == "s3://mlflow/mlartifacts"
    workers = int(declared[declared.index("--workers") + 1])
    assert workers >= 2, "one worker serializes every trainer's requests"


# -- images ---------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_pinned_non_root_and_installed_from_the_constraints(image: str) -> None:
    instructions = _instructions(DOCKERFILES[image])
    bases = [line.split()[1] for line in instructions if line.startswith("FROM")]
    for base in bases:
        assert re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", base), f"{base} is not pinned to a patch version"
        # docker/constraints.txt is resolved for the Python the tests run on.
        assert base.split(":")[1].split(".")[:2] == [str(part) for part in sys.version_info[:2]], base
    users = [line.split()[1] for line in instructions if line.startswith("USER")]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"{image} runs as {users or 'root'}"
    uid = users[-1].split(":")[0]
    assert any("useradd" in line and f"--uid {uid}" in line for line in instructions)
    installs = [part for line in instructions for part in line.split("&&") if "pip install" in part]
    assert installs
    for install in installs:
        assert re.search(r" (-c|--constraint) \S*constraints\.txt", install), f"not constrained: {install}"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and Version(version) and name == canonicalize_name(name), f"{line!r}: write name==version"
        assert name not in pins, f"{name} pinned twice"
        pins[name] = version
    assert list(pins) == sorted(pins), "keep docker/constraints.txt sorted"
    return pins


def test_constraints_pin_every_dependency_of_the_images() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = {"mlflow", "psycopg2-binary", "boto3", "torch"}
    roots |= {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    assert sorted(roots - pins.keys()) == [], "the images' own requirements must be pinned"

    # Every pinned version installed here tells its requirements: each must be pinned as well, at
    # a version it accepts. (A pin at another version than the one installed is checked where it is.)
    missing: dict[str, str] = {}
    rejected: list[str] = []
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version).public != Version(version).public:
            continue
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in pins:
                try:
                    missing[dependency] = importlib.metadata.version(dependency)
                except importlib.metadata.PackageNotFoundError:
                    missing[dependency] = "?"
            elif not requirement.specifier.contains(pins[dependency], prereleases=True):
                rejected.append(f"{name}=={version} requires {requirement}, pinned {pins[dependency]}")
    lines = "\n".join(f"{name}=={version}" for name, version in sorted(missing.items()))
    assert not missing, f"add to {CONSTRAINTS}:\n{lines}"
    assert not rejected, "\n".join(rejected)
