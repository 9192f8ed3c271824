"""The training progress display: tqdm's bar on a terminal, plain lines in a log file or a pipe.

tqdm redraws its bar with carriage returns, several times a second: on a terminal that is one line that moves,
but redirected to a file it is one line of tens of kilobytes. When standard error is not a terminal, the loop
gets PlainProgress instead: one ordinary line at most every EVERY_S seconds, and one at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from tqdm import tqdm

EVERY_S = 15.0


class PlainProgress:
    """The part of tqdm's interface the loop uses (update, set_postfix, close, with), written as plain lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", *, stream: TextIO | None = None,
                 every_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc = total, initial, desc
        self.stream = sys.stderr if stream is None else stream
        self.every_s = EVERY_S if every_s is None else every_s
        self.clock = clock
        self.start_n, self.start_t = initial, clock()
        self.last_t = self.start_t
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_t >= self.every_s:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values  # shown with the next line, never a line of its own

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self.clock())

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def line(self, now: float) -> str:
        elapsed = now - self.start_t
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)",
                 f"{_clock_text(elapsed)} elapsed"]
        if rate > 0 and self.n < self.total:
            parts.append(f"{rate:.2f} it/s, {_clock_text((self.total - self.n) / rate)} left")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        self.last_t = now
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_bar(total: int, initial: int, desc: str, enabled: bool, stream: TextIO | None = None):
    """tqdm's bar when ``stream`` (standard error by default) is a terminal, else PlainProgress."""
    stream = sys.stderr if stream is None else stream
    if not enabled or stream.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=stream)
    return PlainProgress(total, initial, desc, stream=stream)
