"""One library call against endpoints that fail, timed from inside: prints one JSON line.

    python -m tests.reliability.probe save|save-big|load RUN_ID

``save-big`` saves the workload's big state (~13 MB: several parts with 5 MB parts).

The clock starts after the imports and the model are ready, so what is measured is how long
the library takes to give up, not how long Python takes to start.
"""

from __future__ import annotations

import json
import sys
import time

from tests.reliability import workload


def main() -> int:
    what, run_id = sys.argv[1:3]
    import tracking

    model, optimizer = workload.state(2, workload.BIG if what == "save-big" else workload.SMALL)
    start = time.monotonic()
    error: Exception | None = None
    try:
        if what.startswith("save"):
            tracking.log_checkpoint(model, optimizer, epoch=2, metrics={"val_loss": 0.5}, run_id=run_id)
        else:
            tracking.load(run_id)
    except Exception as exc:
        error = exc
    result = {
        "elapsed": time.monotonic() - start,
        "error": None if error is None else f"{type(error).__module__}.{type(error).__qualname__}",
        "message": None if error is None else str(error)[:1000],
        "storage_error": isinstance(error, tracking.StorageError),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
