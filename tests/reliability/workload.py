"""Deterministic checkpoints, made the same way in the test process and in the children it kills.

``state(epoch, hidden)`` is a DigitsMLP and Adam optimizer whose every tensor follows from
``epoch`` alone, so the parent can check that what loads is exactly what some save wrote
(never a torn mix). ``hidden=1024`` gives a ~13 MB checkpoint: with 5 MB parts, a multipart
upload of three parts and a load of three ranged GETs.

As a program it logs checkpoints to an existing run, as a training process would::

    python -m tests.reliability.workload RUN_ID --epochs 2,3 [--hidden 1024] [--keep-last 1]
        [--wait-for PATH] [--touch PATH] [--hold-before-manifest EPOCH --ready PATH --until PATH]

``--wait-for`` waits (bounded) for a file before the first save; ``--touch`` creates one after
the last. ``--hold-before-manifest`` makes that epoch's save stop right before its manifest is
written, create ``--ready`` and wait (bounded) for ``--until``: a slow writer, held still while
another one commits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.models import DigitsMLP

BIG = 1024
SMALL = 16
WAIT_LIMIT_S = 120.0

# val_loss of each epoch: not monotonic, so "best" and "latest" differ.
VAL_LOSS = {1: 0.90, 2: 0.70, 3: 0.80, 4: 0.40, 5: 0.60, 6: 0.10, 7: 0.50, 8: 0.30, 9: 0.35, 10: 0.45}


def val_loss(epoch: int) -> float:
    return VAL_LOSS.get(epoch, 1.0 + epoch / 100)


def state(epoch: int, hidden: int = BIG, salt: int = 0) -> tuple[DigitsMLP, torch.optim.Adam]:
    """The model and optimizer of ``epoch``: weights and Adam moments all drawn from its seed."""
    generator = torch.Generator().manual_seed(1000 * salt + epoch)
    with torch.random.fork_rng():
        torch.manual_seed(1000 * salt + epoch)
        model = DigitsMLP(n_input_features=64, hidden=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer.step()  # elementwise: the same bits in every process
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def model_state(epoch: int, hidden: int = BIG, salt: int = 0) -> dict[str, torch.Tensor]:
    return state(epoch, hidden, salt)[0].state_dict()


def same_state(loaded: dict[str, Any], expected: dict[str, torch.Tensor]) -> bool:
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def log(run_id: str, epoch: int, hidden: int = BIG, salt: int = 0, **kwargs: Any) -> Any:
    import tracking

    model, optimizer = state(epoch, hidden, salt)
    return tracking.log_checkpoint(
        model,
        optimizer,
        epoch=epoch,
        metrics={"val_loss": val_loss(epoch)},
        monitor="val_loss",
        run_id=run_id,
        **kwargs,
    )


def wait_for(path: Path, limit_s: float = WAIT_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    for _ in range(int(limit_s / 0.05) + 1):
        if path.exists():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {limit_s:.0f}s")


# The epoch this process is saving now (saves here are blocking: one at a time).
_saving: list[int] = []


def _hold_before_manifest(epoch: int, ready: Path, until: Path) -> None:
    """Stop this process's save of ``epoch`` right before its manifest is stored."""
    from botocore.client import BaseClient

    from tracking import layout

    original = BaseClient._make_api_call

    def make_api_call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        key = str(params.get("Key", ""))
        if operation == "PutObject" and key.endswith(f"/{layout.MANIFEST_FILE}") and _saving == [epoch]:
            ready.touch()
            wait_for(until)
        return original(self, operation, params)

    BaseClient._make_api_call = make_api_call  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.workload")
    parser.add_argument("run_id")
    parser.add_argument("--epochs", required=True, help="comma-separated epochs to log, in order")
    parser.add_argument("--hidden", type=int, default=BIG)
    parser.add_argument("--salt", type=int, default=0, help="another seed: a re-log with other weights")
    parser.add_argument("--keep-last", type=int, default=None, help="log through a Checkpointer keeping the last N")
    parser.add_argument("--wait-for", type=Path)
    parser.add_argument("--touch", type=Path)
    parser.add_argument("--hold-before-manifest", type=int)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--until", type=Path)
    args = parser.parse_args(argv)
    if args.hold_before_manifest is not None:
        _hold_before_manifest(args.hold_before_manifest, args.ready, args.until)
    import tracking

    epochs = [int(e) for e in args.epochs.split(",")]
    if args.wait_for is not None:
        wait_for(args.wait_for)
    checkpointer = (
        tracking.Checkpointer(keep_last=args.keep_last, monitor="val_loss", run_id=args.run_id)
        if args.keep_last is not None
        else None
    )
    for epoch in epochs:
        _saving[:] = [epoch]
        if checkpointer is not None:
            model, optimizer = state(epoch, args.hidden, args.salt)
            checkpointer.save(model, optimizer, epoch=epoch, metrics={"val_loss": val_loss(epoch)})
        else:
            log(args.run_id, epoch, args.hidden, args.salt)
        print(f"logged epoch {epoch}", flush=True)
    if args.touch is not None:
        args.touch.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
