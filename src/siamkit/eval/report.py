"""Write an evaluation's report.json, roc.png and scores.png, and summarise it in a few lines."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # a bare Figure needs no pyplot and no GUI backend

from ..fileio import atomic_write_bytes, atomic_write_json
from .verification import roc_curve


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _roc_png(report: dict, scores: np.ndarray, same: np.ndarray, baseline_scores: np.ndarray | None) -> bytes:
    return _png(roc_figure(report, scores, same, baseline_scores))


def roc_figure(report: dict, scores, same, baseline_scores=None) -> Figure:
    """The ROC of roc.png as a matplotlib Figure (TensorBoard draws it too)."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same).astype(bool)
    far, tar, _ = roc_curve(scores, same)
    n_impostor = int(np.count_nonzero(~same))
    # A log axis cannot show FAR = 0; start half a step below the smallest reachable FAR instead.
    floor = 0.5 / n_impostor
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot(np.maximum(far, floor), tar, lw=1.5, label="model")
    if baseline_scores is not None:
        b_far, b_tar, _ = roc_curve(baseline_scores, same)
        auc = report.get("baseline", {}).get("roc_auc")
        ax.plot(np.maximum(b_far, floor), b_tar, lw=1.2, ls="--", color="C7",
                label="raw pixels" + (f", AUC = {auc:.4f}" if auc is not None else ""))
    eer = report["eer"]
    ax.plot([max(eer, floor)], [1.0 - eer], "o", color="C3", label=f"EER = {eer:.2%}")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"ROC ({report['score']}), AUC = {report['roc_auc']:.4f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _scores_png(report: dict, scores: np.ndarray, same: np.ndarray) -> bytes:
    # Shared bins so the two histograms compare; widened when all scores (nearly) coincide,
    # since 50 bins cannot split a range of a few float32 steps.
    lo, hi = float(np.min(scores)), float(np.max(scores))
    pad = max(1e-3, 1e-3 * abs(lo)) if hi - lo < 1e-6 * max(1.0, abs(lo)) else 0.0
    bins = np.linspace(lo - pad, hi + pad, 51)
    scores = np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(scores[same], bins=bins, alpha=0.6, color="C2", label=f"genuine ({int(same.sum())})")
    ax.hist(scores[~same], bins=bins, alpha=0.6, color="C3", label=f"impostor ({int((~same).sum())})")
    ax.axvline(report["threshold"], color="k", ls="--", label=f"threshold = {report['threshold']:.4g}")
    ax.set_xlabel(f"{report['score']} score")
    ax.set_ylabel("pairs")
    ax.set_title("score distributions")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


REPORT_FILES = ("report.json", "roc.png", "scores.png")  # what write_report writes into its folder


def write_report(report: dict, scores, same, out_dir: str | os.PathLike, baseline_scores=None) -> None:
    """Write report.json, roc.png (with the raw-pixel baseline's curve, if given) and scores.png, each atomically."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    baseline = None if baseline_scores is None else np.asarray(baseline_scores, dtype=np.float64)
    # Draw everything before writing anything: a plotting failure leaves no partial set of outputs.
    roc, hist = _roc_png(report, scores, same, baseline), _scores_png(report, scores, same)
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "roc.png", roc)
    atomic_write_bytes(out_dir / "scores.png", hist)
    atomic_write_json(out_dir / "report.json", report)


def format_summary(report: dict) -> str:
    """A few human-readable lines of report.json, for the end of ``siamkit evaluate``."""
    tars = "  ".join(f"{tar:.2%} @ FAR {key}" for key, tar in report["tar_at_far"].items())
    return "\n".join(
        [
            f"pairs:     {report['n_pairs']} ({report['n_genuine']} genuine, {report['n_impostor']} impostor), "
            f"{report['score']} score" + _capped(report),
            f"ROC AUC:   {report['roc_auc']:.4f}    EER: {report['eer']:.2%}",
            f"TAR:       {tars}",
            f"accuracy:  {report['accuracy_mean']:.2%} ± {report['accuracy_std']:.2%} "
            f"(per fold, threshold chosen on the other folds)",
            f"threshold: {report['threshold']:.6g} (chosen on all pairs; score >= threshold means same)",
        ]
        + _far_lines(report)
        + ([_baseline_line(report)] if "baseline" in report else [])
        + ([_dlib_line(report)] if "baseline_dlib" in report else [])
    )


def _far_lines(report: dict) -> list[str]:
    """One line per FAR operating point; a FAR that too few impostor pairs decide is named as such."""
    lines = []
    for key, t in report.get("thresholds_at_far", {}).items():
        line = (f"FAR {key}:  threshold {t['threshold']:.6g} (measured FAR {t['far']:.2e}, TAR {t['tar']:.2%}, "
                f"{t['n_impostor']} impostor pairs)")
        if not t["supported"]:
            line += (f"; fewer than 10/FAR = {10 / float(key):.0f} impostor pairs: not a measurement, "
                     f"calibrate on more pairs (evaluate --calibrate)")
        lines.append(line)
    return lines


def _capped(report: dict) -> str:
    """Where the genuine pairs were drawn from a larger set (the all-genuine-pairs protocol's cap)."""
    sampling = report.get("pair_sampling")
    if not sampling:
        return ""
    return (f"; genuine pairs drawn at random from {sampling['genuine_available']} "
            f"(--max-genuine-pairs {sampling['max_genuine_pairs']}, seed {sampling['seed']})")


def _baseline_line(report: dict) -> str:
    b = report["baseline"]
    gain = 100 * (report["accuracy_mean"] - b["accuracy_mean"])
    return (
        f"pixels:    accuracy {b['accuracy_mean']:.1%} ± {b['accuracy_std']:.1%}, AUC {b['roc_auc']:.3f} "
        f"-> the model adds {gain:+.1f} points"
    )


def _dlib_line(report: dict) -> str:
    """The second baseline: whether the model beats the off-the-shelf dlib face model on the same pairs."""
    b = report["baseline_dlib"]
    if "skipped" in b:
        return dlib_line(b)
    return dlib_line(b, 100 * (report["accuracy_mean"] - b["accuracy_mean"]),
                     f"accuracy {b['accuracy_mean']:.1%} ± {b['accuracy_std']:.1%}, AUC {b['roc_auc']:.3f}")


def dlib_line(baseline: dict, gain: float = 0.0, figures: str = "", unit: str = "points") -> str:
    """A summary's `dlib:` line: the off-the-shelf dlib model's ``figures`` and whether the model beats it by
    ``gain`` (``unit``), or why it was not compared."""
    if "skipped" in baseline:
        return f"dlib:      off-the-shelf dlib model not compared: {baseline['skipped']}"
    verdict = "the model beats it" if gain > 0 else "the model does not beat it"
    return f"dlib:      off-the-shelf dlib model, {figures} -> {verdict} ({gain:+.1f} {unit})"
