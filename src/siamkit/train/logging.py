"""What a run records: metrics.csv (one row per logging interval), loss.png, and train.log (its messages)."""
from __future__ import annotations

import csv
import io
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import logger
from ..fileio import atomic_write_bytes, write_error
from . import distributed

COLUMNS = ("step", "epoch", "loss", "metric", "classification", "lr", "images_per_s", "elapsed_s")


class MetricsLog:
    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "metrics.csv"
        self.plot_path = run_dir / "loss.png"
        self.rows: list[dict] = []
        self._last_plot = time.perf_counter()
        if resume and self.path.exists():
            with open(self.path, newline="") as f:
                # A crash can tear the last line; keep only complete rows.
                self.rows = [r for r in csv.DictReader(f) if r.get("elapsed_s") not in (None, "") and _is_int(r["step"])]
        self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def drop_after(self, step: int) -> None:
        """Forget rows logged after ``step`` (a resumed run repeats those steps)."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]
        self._rewrite()

    def log(self, row: dict) -> None:
        row = {k: _fmt(row.get(k, "")) for k in COLUMNS}
        self.rows.append(row)
        # Appended, not rewritten: logging stays O(1) per row however long the run.
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        except OSError as e:
            # A torn last row is dropped when the run resumes (see __init__).
            raise write_error(self.path, e, "rows written before are intact (continue with --resume)") from e

    def plot_every(self, seconds: float) -> None:
        """Redraw loss.png if the last drawing is older than ``seconds`` (drawing costs far more than a row)."""
        now = time.perf_counter()
        if now - self._last_plot > seconds:
            self.plot()
            self._last_plot = now

    def plot(self) -> None:
        if not self.rows:
            return
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        steps = [int(r["step"]) for r in self.rows]
        for key, style in (("loss", "-"), ("metric", "--"), ("classification", ":")):
            values = [float(r[key]) if r[key] not in ("", None) else None for r in self.rows]
            if any(v is not None for v in values) and (key == "loss" or any(r["classification"] for r in self.rows)):
                ax.plot(steps, [float("nan") if v is None else v for v in values], style, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(self.plot_path, buf.getvalue())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _is_int(text) -> bool:
    try:
        int(text)
        return True
    except (TypeError, ValueError):
        return False


class LossWindow:
    """Loss sums and timing since the last metrics row; its sums travel in the checkpoint (exact resume)."""

    KEYS = ("loss", "metric", "classification")

    def __init__(self, saved: dict[str, Any] | None = None, elapsed_before: float = 0.0):
        self.sums = {k: float(saved[k]) if saved else 0.0 for k in self.KEYS}
        self.n = int(saved["n"]) if saved else 0
        self.elapsed_before = elapsed_before  # seconds of the run before this process started (resume)
        self.t_start = self.t_window = time.perf_counter()
        self.timed_steps = 0  # images/s counts only the steps timed in this process

    def add(self, out: dict[str, torch.Tensor]) -> None:
        self.n += 1
        self.timed_steps += 1
        for key in self.KEYS:
            if key in out:
                self.sums[key] += float(out[key].detach())

    def state(self) -> dict[str, Any]:
        return {**self.sums, "n": self.n}

    def row(self, ctx: distributed.DistContext, device: torch.device, step: int, epoch: int, lr: float,
            images_per_step: int, classification: bool) -> dict[str, Any]:
        """The metrics row (losses averaged over the window and the processes); starts the next window."""
        now = time.perf_counter()
        n = max(1, self.n)
        loss, metric, cls = distributed.mean_over_ranks(ctx, device, [self.sums[k] for k in self.KEYS])
        row = {
            "step": step, "epoch": epoch, "loss": loss / n, "metric": metric / n,
            "classification": cls / n if classification else "", "lr": lr,
            "images_per_s": self.timed_steps * images_per_step * ctx.world / (now - self.t_window),
            "elapsed_s": self.elapsed_before + now - self.t_start,
        }
        self.sums, self.n = dict.fromkeys(self.KEYS, 0.0), 0
        self.timed_steps, self.t_window = 0, time.perf_counter()
        return row


class RunLogFile:
    """The siamkit logger's messages of a run, kept from the start and written to RUN/train.log once the folder exists.

    Nothing is written for a run that fails before its folder is made (no half-written output).
    """

    def __init__(self, enabled: bool):
        self.buffer = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.enabled = enabled
        if enabled:
            logger.addHandler(self.buffer)

    def open(self, run_dir: Path) -> None:
        if not self.enabled:
            return
        # backslashreplace: a message naming a file whose name is not UTF-8 is written escaped, never dropped
        target = logging.FileHandler(run_dir / "train.log", encoding="utf-8", errors="backslashreplace")
        target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.buffer.setTarget(target)
        self.buffer.flushLevel = logging.NOTSET  # from now on every message is written at once
        self.buffer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        logger.removeHandler(self.buffer)
        if self.buffer.target is not None:
            self.buffer.flush()
            self.buffer.target.close()
        self.buffer.close()
