"""Logging: rqat_sdk logs through the standard ``logging`` module under the ``rqat_sdk`` name.

llmcompressor and compressed-tensors log through loguru at INFO level, and warn about choices this SDK
makes on purpose (saving a stage checkpoint in the dense format, running on CPU); their output is muted
while they work for us, unless the ``rqat_sdk`` logger is at DEBUG. (Importing llmcompressor configures
its logger and may print a line before it can be muted.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

UPSTREAM_LOGGERS = ("llmcompressor", "compressed_tensors")


@contextlib.contextmanager
def quiet_upstream_logs() -> Iterator[None]:
    # Importing them configures (and enables) their loggers, so import first, then mute.
    import compressed_tensors  # noqa: F401
    import llmcompressor  # noqa: F401
    from loguru import logger

    if logging.getLogger("rqat_sdk").isEnabledFor(logging.DEBUG):
        yield
        return
    for name in UPSTREAM_LOGGERS:
        logger.disable(name)
    try:
        yield
    finally:
        for name in UPSTREAM_LOGGERS:
            logger.enable(name)


def configure(verbosity: int = 0) -> None:
    """Console logging for the command line: INFO by default, DEBUG (and upstream logs) with -v."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("rqat_sdk").setLevel(level)
