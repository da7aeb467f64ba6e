"""Property tests: whatever they are handed, the parsers and validators raise only the library's errors.

Manifests are data from the store, so ``Manifest.from_json`` raises :class:`IntegrityError` or
succeeds; argument validation raises ``TypeError`` / ``ValueError`` (or a ``TrackingError``),
never an ``AttributeError``, ``KeyError``, ``OverflowError`` or ``RecursionError`` from deep inside.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tracking
from tests.unit.test_hostile_inputs import valid_manifest
from tracking import layout
from tracking.checkpoint import snapshot_checkpoint
from tracking.config import ENV_VARS, TrackingConfig
from tracking.errors import IntegrityError, TrackingError
from tracking.manifest import Manifest
from tracking.uri import RunSource, parse_source

# No example database: the tree is shared, and every run should try fresh examples anyway.
FAST = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ALLOWED = (TrackingError, TypeError, ValueError)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


WHERE = f"run r1, checkpoint-epoch-0001 (m-{'0' * 32})"


def from_json(raw: bytes) -> Manifest | None:
    """Parse ``raw``; None when it is refused as it should be, with an IntegrityError naming it."""
    try:
        manifest = Manifest.from_json(raw, where=f"{WHERE}: manifest.json")
    except IntegrityError as exc:
        assert str(exc).startswith(f"{WHERE}: manifest.json ")
        return None
    # Whatever is accepted can be written back and read again, unchanged (`tracking show` does).
    again = Manifest.from_json(manifest.to_json(), where="again")
    assert again == manifest
    return manifest


def dumps(value: Any) -> bytes:
    # allow_nan: the store may hold what the writer never writes, NaN and Infinity included.
    return json.dumps(value, allow_nan=True).encode()


@FAST
@given(json_values)
def test_any_json_is_a_manifest_or_an_integrity_error(value: Any) -> None:
    from_json(dumps(value))


@FAST
@given(st.binary(max_size=200))
@example(b"[" * 100_000)
@example(b'{"format_version": 1e999}')
@example(json.dumps(valid_manifest()).replace('"n_input_features": 6', '"n_input_features": 1e999').encode())
def test_any_bytes_are_a_manifest_or_an_integrity_error(raw: bytes) -> None:
    from_json(raw)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a JSON value, the value itself first."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += paths(child, (*prefix, index))
    return out


VALID_PATHS = paths(valid_manifest())[1:]


@st.composite
def mutated_manifests(draw: st.DrawFn) -> bytes:
    """A valid manifest with a few of its fields deleted, replaced by random JSON, or added to."""
    data = valid_manifest()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(VALID_PATHS))
        parent: Any = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(json_values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=10))] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    return dumps(data)


@FAST
@given(mutated_manifests())
def test_a_mutated_manifest_is_a_manifest_or_an_integrity_error(raw: bytes) -> None:
    from_json(raw)


def test_the_unmutated_manifest_is_accepted() -> None:
    assert from_json(dumps(valid_manifest())) is not None


# ------------------------------------------------------------ sources and layout

sources = st.one_of(
    st.text(),
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(["runs:/", "models:/", "models:/m-", " runs:/", ""]),
        st.text(),
    ),
    st.none(),
    st.integers(),
    st.binary(max_size=10),
    st.lists(st.text(max_size=3), max_size=2),
)


@FAST
@given(sources)
def test_parse_source_raises_only_value_error(source: Any) -> None:
    try:
        parsed = parse_source(source)
    except ValueError:
        return
    assert isinstance(parsed, RunSource)
    assert [parsed.run_id, parsed.model_id, parsed.model_name].count(None) == 2  # exactly one of them
    assert parsed.model_id is None or (parsed.model_id.startswith("m-") and "/" not in parsed.model_id)


@FAST
@given(
    st.one_of(
        st.text(),
        st.builds(lambda k, s: f"checkpoint-{k}-{s}", st.sampled_from(["epoch", "step"]), st.text(max_size=6)),
    )
)
def test_key_of_is_a_key_or_none(name: str) -> None:
    found = layout.key_of(name)
    assert found is None or (found[0] in layout.KEYS and isinstance(found[1], int) and found[1] >= 0)
    assert found is None or (name.isascii() and name.startswith(f"checkpoint-{found[0]}-"))


@FAST
@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["epoch", "step"]))
def test_key_of_inverts_checkpoint_name(key: int, keyed_by: str) -> None:
    assert layout.key_of(layout.checkpoint_name(key, keyed_by)) == (keyed_by, key)


@FAST
@given(st.floats(), st.one_of(st.none(), st.floats()), st.sampled_from(layout.MODES))
def test_is_better(value: float, than: float | None, mode: str) -> None:
    better = layout.is_better(value, than, mode)
    assert isinstance(better, bool)
    if than is None or math.isnan(than):
        assert better
    elif not math.isnan(value):
        assert better == (value < than if mode == "min" else value > than)


# ------------------------------------------------------------ public arguments

anything = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
    st.builds(torch.tensor, st.floats(allow_nan=True)),
)
# Metrics are a mapping of values within float range: the other two cases are known defects of
# check_metrics, each pinned by an xfail test below (so they are not left to chance here).
metric_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**300), 10**300),
    st.floats(),
    st.text(max_size=5),
    st.builds(torch.tensor, st.floats(allow_nan=True)),
    st.lists(st.floats(), max_size=2),
)
metrics_arg = st.one_of(
    st.none(), st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), metric_values, max_size=3)
)
MODEL = torch.nn.Linear(2, 1)


@FAST
@given(
    # Each argument is valid about half the time, so that every check after the first is reached.
    epoch=st.one_of(st.integers(min_value=0, max_value=10**6), anything),
    step=st.one_of(st.none(), st.integers(min_value=0), anything),
    metrics=st.one_of(st.dictionaries(st.sampled_from(["loss", "acc"]), st.floats(-1e6, 1e6)), metrics_arg),
    monitor=st.one_of(st.none(), st.sampled_from(["loss", "acc"]), anything),
    mode=st.one_of(st.sampled_from(layout.MODES), anything),
    extra=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), anything, max_size=2)),
)
def test_snapshot_checkpoint_validates_its_arguments(
    epoch: Any, step: Any, metrics: Any, monitor: Any, mode: Any, extra: Any
) -> None:
    try:
        snapshot = snapshot_checkpoint(
            MODEL, None, epoch=epoch, step=step, metrics=metrics, monitor=monitor, mode=mode, extra=extra
        )
    except ALLOWED:
        return
    assert snapshot.manifest.epoch == epoch
    assert all(math.isfinite(v) for v in snapshot.manifest.metrics.values())


def test_a_metric_beyond_floats_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        snapshot_checkpoint(MODEL, None, epoch=1, metrics={"m": 10**400})


def test_metrics_that_are_not_a_mapping_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        snapshot_checkpoint(MODEL, None, epoch=1, metrics=[("m", 1.0)])  # type: ignore[arg-type]


@FAST
@given(
    every_n_epochs=st.one_of(st.integers(), anything),
    keep_last=st.one_of(st.none(), st.integers(), anything),
    keep_best=st.one_of(st.none(), st.integers(), anything),
    monitor=st.one_of(st.text(max_size=5), anything),
    mode=st.one_of(st.sampled_from(layout.MODES), anything),
)
def test_checkpointer_validates_its_arguments(
    every_n_epochs: Any, keep_last: Any, keep_best: Any, monitor: Any, mode: Any
) -> None:
    try:
        tracking.Checkpointer(every_n_epochs, keep_last, keep_best, monitor, mode)
    except ALLOWED:
        pass


env_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "0", "-1", "1e9", "true", "no", "http://", "s3://b", "http://[::1", "nan", "99999999999"]),
)


@FAST
@given(st.dictionaries(st.one_of(st.sampled_from(sorted(ENV_VARS.values())), st.text(max_size=8)), env_values))
def test_config_from_any_environment(environ: dict[str, str]) -> None:
    try:
        config = TrackingConfig.from_env(copy.copy(environ))
    except ALLOWED:
        return
    assert config.part_size > 0
