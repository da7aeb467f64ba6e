"""What a logger emits during a block, for tests that check what a library says (or no longer says)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def messages_of(name: str) -> Iterator[list[str]]:
    """Every message logger ``name`` emits inside the block, whatever handlers it writes to besides."""
    handler = _Messages()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
