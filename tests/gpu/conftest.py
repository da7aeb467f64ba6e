"""GPU tier: the device rules and the framework integrations on a real CUDA device. Run it whole on any
CUDA machine with ``make test-gpu`` (or ``bash tests/gpu/device_check.sh``, which brings what a bare
machine lacks from the wheelhouse); where CUDA is absent every test is skipped, with the reason printed.

It uses the unit tier's stores (moto S3, a sqlite tracking store in tmp_path): the GPU machine
needs no server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.unit.conftest import mocked_s3, s3_experiment, tracking_s3_bucket

__all__ = ["mocked_s3", "s3_experiment", "tracking_s3_bucket"]

# cuBLAS reads this once, when it makes its first handle: set before any test's first matmul, so that
# the bit-for-bit tests that come later in the session (the pipelines', Lightning's, the Trainer's) run
# on the deterministic workspace their deterministic settings ask for, not on the first test's default.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Variables the frameworks' deterministic modes set for the whole process (Lightning: the first; the
# Hugging Face Trainer's full_determinism: all of them).
DETERMINISM_VARIABLES = (
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_LAUNCH_BLOCKING",
    "ASCEND_LAUNCH_BLOCKING",
    "HCCL_DETERMINISTIC",
    "FLASH_ATTENTION_DETERMINISTIC",
)


@pytest.fixture
def restored_determinism(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test whose framework switches on deterministic kernels process-wide: they are as they were after it."""
    for name in DETERMINISM_VARIABLES:
        # Recorded as it was (set or not), so that the test's end puts it back whatever the framework wrote.
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = (
        f"no CUDA device here (torch {torch.__version__}): run `make test-gpu` or tests/gpu/device_check.sh "
        "on a GPU machine"
    )
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
