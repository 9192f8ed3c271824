"""The one exception type that the command line turns into a single clear error line, and siamkit's logger.

Messages go through the standard ``logging`` module under the "siamkit" logger. By default it prints
one line per message on stderr ("siamkit: warning: ..." / "siamkit: ..."), the voice of the error
lines; a Python user silences it with ``logging.getLogger("siamkit").setLevel(logging.ERROR)`` or
redirects it by replacing its handlers. Training also writes the messages to RUN/train.log.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("siamkit")


class SiamkitError(Exception):
    """A problem with the user's input (data, options, files): the message names it and the fix."""


class _StderrLines(logging.Handler):
    """One 'siamkit: [warning: ]message' line on whatever sys.stderr is at the time (test captures too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            sys.stderr.write(f"siamkit: {kind}{record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not break training
            self.handleError(record)


if not logger.handlers:
    logger.addHandler(_StderrLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the default handler already prints it; a root handler would print it twice


def warn(message: str) -> None:
    """One warning line through the siamkit logger."""
    logger.warning(message)


def info(message: str) -> None:
    """One informational line through the siamkit logger."""
    logger.info(message)
