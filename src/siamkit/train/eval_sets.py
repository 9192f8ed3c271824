"""--eval-data: validation sets of pairs (.bin files) evaluated during training and at its end.

Each set keeps its own pairs and folds (data/binsets.py); every --eval-every steps the model (its moving average
with --ema-decay) is evaluated on each, a line per set goes to train.log and a row to RUN/eval/eval_data.csv; at the
end each set's full report (report.json, roc.png, scores.png) goes to RUN/eval/NAME/, NAME its file name without
.bin.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.cache import load_data
from ..data.sources import IdentityDataset
from ..data.transforms import Preprocess
from ..errors import info
from ..eval.protocol import evaluate
from ..eval.report import write_report
from ..fileio import atomic_write_bytes
from .ema import evaluation_weights

CSV_FILE = "eval_data.csv"
CSV_FIELDS = ("step", "set", "n_pairs", "accuracy_mean", "accuracy_std", "roc_auc", "eer", "tar_at_far_1e-3")


@dataclass
class EvalSet:
    name: str  # the file name without .bin: its report folder RUN/eval/NAME/
    data: IdentityDataset


def load_eval_sets(cfg: TrainConfig, pre: Preprocess) -> list[EvalSet]:
    """The --eval-data sets, decoded with the run's preprocessing (before the run folder exists: a bad file is one
    error line and nothing written)."""
    return [EvalSet(Path(path).stem, load_data(path, pre, cfg.cache_dir, cfg.cache_max_gb, progress=False))
            for path in cfg.eval_data or ()]


def evaluate_sets(run: Any, score: str, step: int, final: bool = False) -> float | None:
    """Evaluate ``run``'s model (a train.run.Run: this module is below it) on every --eval-data set: log a line and
    a CSV row each (all processes embed a share; the main one writes), and at the end each set's report. -> their
    mean 10-fold accuracy (None without sets)."""
    if not run.eval_sets:
        return None
    accuracies = []
    for entry in run.eval_sets:
        with evaluation_weights(run.training.ema):
            result = evaluate(run.training.model, run.pre, entry.data, score=score, flip=run.cfg.eval_flip,
                              shifts=run.cfg.eval_shifts, device=run.device, seed=run.cfg.seed,
                              sharded=run.ctx.enabled)
        report = result.report
        accuracies.append(report["accuracy_mean"])
        if not run.ctx.is_main:
            continue
        info(f"step {step}: {entry.name} accuracy {report['accuracy_mean']:.2%} ± {report['accuracy_std']:.2%}, "
             f"ROC AUC {report['roc_auc']:.4f}, TAR {report['tar_at_far']['1e-3']:.2%} @ FAR 1e-3 "
             f"({report['n_pairs']} pairs; raw pixels {report['baseline']['accuracy_mean']:.2%})")
        _append_row(run.run_dir / "eval" / CSV_FILE, step, entry.name, report)
        if final:
            write_report(report, result.scores, result.same, run.run_dir / "eval" / entry.name, result.baseline_scores)
    return sum(accuracies) / len(accuracies)


def _append_row(path: Path, step: int, name: str, report: dict) -> None:
    """The file rewritten whole, atomically, with the new row: a run stopped mid-write keeps the rows before."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            # a resumed run's rows from before its checkpoint, and this step's other sets
            rows = [row for row in csv.DictReader(f)
                    if int(row["step"]) < step or (int(row["step"]) == step and row["set"] != name)]
    rows.append({"step": step, "set": name, "n_pairs": report["n_pairs"], "accuracy_mean": report["accuracy_mean"],
                 "accuracy_std": report["accuracy_std"], "roc_auc": report["roc_auc"], "eer": report["eer"],
                 "tar_at_far_1e-3": report["tar_at_far"]["1e-3"]})
    lines = [",".join(CSV_FIELDS)] + [",".join(str(row[k]) for k in CSV_FIELDS) for row in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
