"""The gloo group ranks coordinate checkpoints on outlasts a long synchronous upload."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tracking.parallel import distributed


def test_the_coordination_group_waits_longer_than_torchs_default(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        default = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        coordination = distributed.group()._get_backend(torch.device("cpu")).options._timeout
        # Rank 0 may upload for hours while the other ranks wait in this group; torch's default is 30 min.
        assert coordination == distributed.COORDINATION_TIMEOUT > default
    finally:
        distributed.release()
        dist.destroy_process_group()
