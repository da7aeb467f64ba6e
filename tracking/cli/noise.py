"""MLflow log lines the commands silence: notes about choices the project made on purpose."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def muted(logger: str, starting: str) -> Iterator[None]:
    """Drop the records of ``logger`` whose message starts with ``starting`` while the block runs."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starting)

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)
