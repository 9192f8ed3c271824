"""Progress bars: tqdm's on a terminal; a plain line now and then when standard error goes to a file or a pipe.

tqdm redraws its bar with carriage returns several times a second. On a terminal that is one moving line; in a
log file it is one line of thousands of updates (a 500-step run wrote 60 kB). When standard error is not a
terminal, a bar here prints its state as a plain line at most every PLAIN_EVERY_S seconds and at most every
1/PLAIN_LINES of its total (so a slow machine's log is no longer than a fast one's), and once at the end.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

PLAIN_EVERY_S = 10.0
PLAIN_LINES = 20  # at most this many lines between the first and the last, however long the bar takes


class _PlainLines:
    """A stream for tqdm that turns each redraw ("\\r" + state + padding) into one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:  # tqdm's own newline at the end, and the blanking of a bar that does not stay, carry nothing
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on standard error: a bar on a terminal, plain lines every few seconds elsewhere."""
    stream = sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)  # a file has no width to follow
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    if total:
        kwargs.setdefault("miniters", math.ceil(total / PLAIN_LINES))
    # maxinterval inf: tqdm's monitor thread would otherwise redraw a slow bar every 10 s besides its own lines
    return tqdm(iterable, file=_PlainLines(stream), mininterval=PLAIN_EVERY_S, maxinterval=math.inf, **kwargs)
