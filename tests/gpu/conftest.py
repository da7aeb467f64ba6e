"""GPU tier: the device rules on a real CUDA device. Run it whole on any CUDA machine with
``make test-gpu``; where CUDA is absent every test is skipped, with the reason printed (``-ra``).

It uses the unit tier's stores (moto S3, a sqlite tracking store in tmp_path): the GPU machine
needs no server.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.conftest import empty_tracking_db, mocked_s3, s3_experiment, tracking_store

__all__ = ["empty_tracking_db", "mocked_s3", "s3_experiment", "tracking_store"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = f"no CUDA device here (torch {torch.__version__}): run `make test-gpu` on a GPU machine"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
