"""A run's calibrated thresholds: which one `verify` uses, and where `evaluate --calibrate` stores new ones.

Training calibrates on its held-out identities and stores the thresholds in the checkpoint. A user who
calibrates on their own people (`siamkit evaluate RUN --data FOLDER --calibrate`) gets RUN/calibration.json:
``{"current": ENTRY, "history": [older ENTRY, ...]}``, newest last in the history. An entry holds the
accuracy-maximising ``threshold``, ``thresholds_at_far`` (as in report.json), its ``source`` and when it was made.
Torch-free: an exported model carries an entry in its metadata and uses the same choice of threshold.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import SiamkitError
from .fileio import atomic_write_json, file_lock, lock_path
from .options import one_of

# The values each score takes: cosine of two embeddings, minus the distance between them. A threshold outside
# makes every decision the same, whatever the images: a mistake, never a choice.
SCORE_RANGES = {"cosine": (-1.0, 1.0), "euclidean": (-math.inf, 0.0)}
THRESHOLD_OPTIONS_CONFLICT = "both choose the threshold"
CALIBRATION_FILE = "calibration.json"
TRAINING_SOURCE = "held-out identities at the end of training"


def calibration_entry(report: dict, source: str) -> dict:
    """The thresholds of a report.json dictionary, with where they come from."""
    return {
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score": report["score"],
        "n_pairs": report["n_pairs"],
        "n_impostor": report["n_impostor"],
        "threshold": report["threshold"],
        "thresholds_at_far": report["thresholds_at_far"],
    }


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("current"), dict) or not isinstance(
                data.get("history", []), list):
            raise ValueError("no 'current' entry")
    except (OSError, ValueError) as e:
        raise SiamkitError(f"{path} is not a readable calibration ({type(e).__name__}); delete it to fall back to "
                           f"the training's threshold, or run evaluate --calibrate again") from None
    return data


def record_calibration(run_dir: str | os.PathLike, entry: dict, previous: dict | None = None) -> Path:
    """Make ``entry`` the run's current calibration; the one it replaces goes to the history.

    ``previous``: the calibration in use before the run had a calibration file (the training's), kept as the
    first entry of the history.
    """
    path = Path(run_dir) / CALIBRATION_FILE
    # Read and replaced under a lock: two calibrations at once both end up in the file, neither history lost.
    with file_lock(lock_path(path), f"the calibration {path}"):
        if path.exists():
            old = _read(path)
            history = [*old.get("history", []), old["current"]]
        else:
            history = [] if previous is None else [previous]
        atomic_write_json(path, {"current": entry, "history": history})
    return path


def prepare_calibration(run_dir: str | os.PathLike, ckpt: dict) -> dict | None:
    """Before `evaluate --calibrate` evaluates anything: the calibration it will replace (read and checked now), and
    a run folder it can write its calibration.json into, so that a failure leaves no report behind."""
    previous = run_calibration(run_dir, ckpt)
    try:
        with tempfile.TemporaryFile(dir=run_dir):  # a file made and deleted: os.access says yes to root everywhere
            pass
    except OSError as e:
        raise SiamkitError(f"--calibrate writes {Path(run_dir) / CALIBRATION_FILE}, but {run_dir} is not writable "
                           f"({e.strerror}); make it writable, or evaluate without --calibrate") from None
    return previous


def run_calibration(run_dir: str | os.PathLike, ckpt: dict) -> dict | None:
    """The calibration a run's verify uses: RUN/calibration.json, else the checkpoint's (training's), else None."""
    path = Path(run_dir) / CALIBRATION_FILE
    if path.exists():
        return _read(path)["current"]
    if ckpt.get("threshold") is None:
        return None
    calibration = {"source": TRAINING_SOURCE, "threshold": float(ckpt["threshold"]),
                   "thresholds_at_far": dict(ckpt.get("thresholds_at_far") or {})}
    if ckpt.get("threshold_source"):  # a built-in model's own threshold (models/zoo.py), said as it is
        calibration.update(source=ckpt["threshold_source"], what=ckpt["threshold_source"])
    return calibration


def far_key(far: float) -> str:
    """1e-3 -> "1e-3", the spelling of report.json's keys."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def choose_threshold(calibration: dict | None, far: float | None = None) -> tuple[float, str]:
    """(threshold, what it is): the accuracy-maximising one, or the one calibrated at ``far``."""
    if calibration is None:
        raise SiamkitError("this model has no calibrated threshold (trained without held-out identities); "
                           "pass a threshold, or calibrate it with siamkit evaluate RUN --data FOLDER --calibrate")
    source = calibration.get("source", "unknown")
    if far is None:
        return float(calibration["threshold"]), calibration.get("what") or f"accuracy-maximising threshold, calibrated on {source}"
    at_far = calibration.get("thresholds_at_far") or {}
    match = [key for key in at_far if abs(float(key) - far) <= 1e-9 * far]
    if not match:
        have = ", ".join(at_far) or "none"
        raise SiamkitError(f"no threshold calibrated at FAR {far:g} (calibrated: {have}); pick one of those, or "
                           f"calibrate with siamkit evaluate RUN --data FOLDER --calibrate")
    t = at_far[match[0]]
    note = "" if t.get("supported", True) else f", too few impostor pairs ({t['n_impostor']}) to measure it"
    return float(t["threshold"]), f"threshold at FAR {match[0]}, calibrated on {source}{note}"


def check_threshold(threshold: float, score: str, option: str = "--threshold") -> float:
    """``threshold`` if it is finite and within ``score``'s range (SCORE_RANGES); else one line saying so."""
    low, high = SCORE_RANGES.get(score, (-math.inf, math.inf))
    span = f"[{low:g}, {high:g}]" if math.isfinite(low) else f"at most {high:g} (minus a distance)"
    if not math.isfinite(threshold):
        raise SiamkitError(f"{option} {threshold} is not a finite number; pass a threshold the {score} score can "
                           f"take: {span}")
    if not low <= threshold <= high:
        every = "same" if threshold < low else "different"
        raise SiamkitError(f"{option} {threshold:g} is outside the {score} score's range {span}: every pair would be "
                           f"{every}; pass a threshold in that range")
    return threshold


def pick_threshold(calibration: dict | None, threshold: float | None, far: float | None, score: str,
                   names: tuple[str, str] = ("--threshold", "--far")) -> tuple[float, str]:
    """(threshold, what it is) for a decision: the one given (checked), else the calibrated one at ``far`` or the
    accuracy-maximising one. ``names``: how the caller spells the two options (flags, or Python's keywords)."""
    if threshold is not None and far is not None:
        raise one_of(names[0], names[1], THRESHOLD_OPTIONS_CONFLICT)
    if threshold is not None:
        return check_threshold(float(threshold), score, names[0]), f"given with {names[0]}"
    if far is not None and not (math.isfinite(far) and 0 < far < 1):
        raise SiamkitError(f"{names[1]} {far} is not a false-accept rate; pass one in (0, 1), e.g. 1e-3")
    return choose_threshold(calibration, far)
