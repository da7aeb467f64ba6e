"""The GPU machine's wheelhouse list (tests/gpu/wheelhouse.txt): every requirement of what it fetches is fetched
or on that machine's image, and ``check`` names a folder's missing, stray and wrong wheels."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu import wheelhouse


def test_what_the_wheels_require_is_fetched_or_on_the_gpu_image() -> None:
    assert wheelhouse.unmet() == []


def test_a_requirement_left_out_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched, image = wheelhouse._sections()
    monkeypatch.setattr(wheelhouse, "_sections", lambda: ([n for n in fetched if n != "jmespath"], image))
    assert wheelhouse.unmet() == [
        f"jmespath: required by {name}, neither fetched nor on the GPU image" for name in ("boto3", "botocore")
    ]


def test_check_names_missing_stray_and_wrong_wheels(tmp_path: Path) -> None:
    pins = dict(pin.split("==") for pin in wheelhouse.pins())
    for name, version in pins.items():
        if name not in ("moto", "cffi", "boto3"):
            (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").touch()
    (tmp_path / f"cffi-{pins['cffi']}-cp311-cp311-manylinux_2_17_x86_64.whl").touch()
    (tmp_path / "boto3-0.1-py3-none-any.whl").touch()
    (tmp_path / "leftover-1.0-py3-none-any.whl").touch()
    assert sorted(wheelhouse.check(tmp_path)) == sorted(
        [
            f"cffi-{pins['cffi']}-cp311-cp311-manylinux_2_17_x86_64.whl: not built for CPython 3.12",
            f"boto3-0.1-py3-none-any.whl: version 0.1, {pins['boto3']} is installed here",
            "leftover-1.0-py3-none-any.whl: not in wheelhouse.txt",
            "moto: no wheel",
        ]
    )
