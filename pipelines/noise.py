"""The frameworks' console noise the Lightning and Hugging Face pipelines leave out, and only that.

Each filter matches one message by its text and where it comes from, for the length of the
pipeline's training: every other warning and log line of the libraries still shows, and the
library (``tracking``) installs none of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tracking.cli.noise import muted

# torch deprecates LeafSpec; Lightning's own pytree helper still builds one for every batch's data:
# a FutureWarning about Lightning's code, that no user of the pipeline can act on.
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"
# Lightning's adverts for its cloud services (litlogger, litmodels), logged at INFO on every fit.
TIP_PREFIX = "💡 Tip:"
TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"
# transformers draws a progress bar for the shards of each checkpoint it saves (one, for this model),
# although the pipeline's Trainer runs with disable_tqdm.
SHARDS_BAR = "Writing model shards"
# The Trainer orders its checkpoint folders by mtime and, when two are less than a second apart
# (this small model's epochs), says the filesystem's mtimes are unreliable: they are not, and the
# numerical order it falls back to is the order it needs anyway.
MTIME_LOGGER = "transformers.trainer_utils"
MTIME_WARNING = "mtime may not be reliable on this filesystem"


@contextmanager
def lightning_quiet() -> Iterator[None]:
    """Leave out Lightning's "💡 Tip:" lines and the LeafSpec deprecation warning while the block runs."""
    with muted(TIP_LOGGER, TIP_PREFIX), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning, module=LEAFSPEC_MODULE)
        yield


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """Leave out transformers' "Writing model shards" progress bar and its mtime warning while the block runs."""
    from transformers.utils import logging as hf_logging

    previous: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any] | None = None

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") == SHARDS_BAR:
            kwargs = {**kwargs, "disable": True}  # still iterates: only the drawing is left out
        return factory(*args, **kwargs) if previous is None else previous(factory, args, kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        with muted(MTIME_LOGGER, MTIME_WARNING):
            yield
    finally:
        hf_logging.set_tqdm_hook(previous)
