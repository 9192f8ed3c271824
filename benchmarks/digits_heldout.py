"""Held-out verification on the built-in digits: siamkit's model against raw-pixel cosine similarity.

The main job (`siamkit train` with no arguments) trains on 8 of scikit-learn's 10 digits and verifies
the 2 it never saw (--val-identities 0.2; which two depends on --seed). This script runs that for each
seed and option string and prints, beside the model's held-out report, the same report for the raw
pixels (cosine of the flattened 32x32 images) on exactly the same pairs: the baseline a learned
embedding has to beat.

    python benchmarks/digits_heldout.py                                   # defaults, seeds 0 and 1
    python benchmarks/digits_heldout.py --configs "" "--steps 100" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from siamkit.cli import build_parser  # noqa: E402
from siamkit.config import TrainConfig  # noqa: E402
from siamkit.data.sources import default_preprocess, load_source, split_identities  # noqa: E402
from siamkit.eval.protocol import pairs_for  # noqa: E402
from siamkit.eval.verification import pair_scores, verification_report  # noqa: E402
from siamkit.train.loop import train  # noqa: E402


def pixel_baseline(seed: int) -> tuple[list[str], dict]:
    """Held-out digits of this seed and the report of raw-pixel cosine scores on the evaluation's pairs."""
    ds = load_source("digits", default_preprocess("digits"))
    _, held_out = split_identities(ds, TrainConfig.val_identities, seed)
    pairs = pairs_for(held_out, None, seed)
    x = held_out.images.float().reshape(len(held_out.labels), -1).numpy()
    scores = pair_scores(x[pairs.idx_a], x[pairs.idx_b], "cosine")
    return list(held_out.names), verification_report(scores, pairs.same, pairs.fold, "cosine")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[""], help="siamkit train options, one string per row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="digits_heldout_"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| options | seed | held-out digits | model 10-fold accuracy | model ROC AUC | pixels 10-fold accuracy "
          "| pixels ROC AUC | train wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for options in args.configs:
        for seed in args.seeds:
            out = work / f"run{abs(hash((options, seed)))}"
            ns = build_parser().parse_args(["train", *shlex.split(options), "--out", str(out), "--seed", str(seed)])
            cfg = TrainConfig.from_dict(vars(ns))
            wall = time.perf_counter()
            train(cfg, progress=False)
            wall = time.perf_counter() - wall
            model = json.loads((out / "eval" / "report.json").read_text())
            names, pixels = pixel_baseline(seed)
            print(f"| `{options or '(defaults)'}` | {seed} | {', '.join(names)} | {model['accuracy_mean']:.4f} "
                  f"| {model['roc_auc']:.4f} | {pixels['accuracy_mean']:.4f} | {pixels['roc_auc']:.4f} | {wall:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
