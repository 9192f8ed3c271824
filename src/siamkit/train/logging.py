"""metrics.csv (one row per logging interval) and loss.png (the live loss curve)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..fileio import atomic_write_bytes, write_error

COLUMNS = ("step", "epoch", "loss", "metric", "classification", "lr", "images_per_s", "elapsed_s")


class MetricsLog:
    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "metrics.csv"
        self.plot_path = run_dir / "loss.png"
        self.rows: list[dict] = []
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
