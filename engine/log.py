"""The engine's default log output: its INFO lines (what it chose), unless the application configured logging.

Importing kvloom only gives the "kvloom" logger a NullHandler (the library convention). An engine, or the
`kvloom` command line, calls configure_default_logging() when it starts, so that a script that configured
nothing still sees what the engine chose. The root logger is never touched.
"""

from __future__ import annotations

import logging
import os
import threading

LOGGER_NAME = "kvloom"
FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"
_lock = threading.Lock()  # engines may start in several threads at once

__all__ = ["configure_default_logging"]


def configure_default_logging() -> None:
    """Send the "kvloom" logger's records to stderr unless the application configured logging.

    Does nothing when KVLOOM_CONFIGURE_LOGGING=0, when the root logger has handlers (the application chose
    where log records go), or when the "kvloom" logger has a handler other than a NullHandler (the
    application, or an earlier call, set it up). Otherwise it attaches one StreamHandler to the "kvloom"
    logger at level $KVLOOM_LOGGING_LEVEL (default INFO) and stops propagation to the root logger.
    Safe to call any number of times.
    """
    if os.environ.get("KVLOOM_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger(LOGGER_NAME)
    with _lock:
        if logging.getLogger().handlers:
            return
        if any(type(h) is not logging.NullHandler for h in logger.handlers):
            return
        level = os.environ.get("KVLOOM_LOGGING_LEVEL", "INFO").strip().upper() or "INFO"
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.setLevel(level)
        except (ValueError, TypeError):
            logger.setLevel(logging.INFO)
            logger.warning("KVLOOM_LOGGING_LEVEL=%r is not a logging level; using INFO", level)
