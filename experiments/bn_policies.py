"""Every BatchNorm policy, side by side, on held-out identities: accuracy, EER and cost.

For each policy (joint, sequential, mean, anchor, frozen) and two settings,
  triplet+cls  triplet loss + a softmax classifier on every branch (W = 1), explicit triplets
  contrastive  contrastive loss on explicit pairs,
this trains a ResNet18 from scratch with siamkit's own training function, the same seed (so the same
identity split and the same batches) and the same step budget, then reads the held-out evaluation
(10-fold accuracy, EER) from the run's eval/report.json. Times are of the whole run (decoding the
data, training, evaluating): CPU time is ``time.process_time`` (all threads of this process), wall
time is ``time.perf_counter``; "train s" is the training loop alone (wall, from metrics.csv).

    python experiments/bn_policies.py --steps 150 --batch-size 16 --image-size 64 64 --out /tmp/bn_policies

Data: ../shared/data/rof_neutral beside the repository; override with --data or SIAMKIT_DATA.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

# On a shared machine OpenMP threads that spin while waiting burn CPU time without doing work and
# inflate every timing; passive waiting keeps CPU time a measure of the work. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from siamkit.batchnorm import POLICIES as BN_POLICIES  # noqa: E402
from siamkit.config import TrainConfig  # noqa: E402
from siamkit.train.loop import train  # noqa: E402

SETTINGS = {
    "triplet+cls": dict(loss="triplet", classification_weight=1.0, classifier="softmax"),
    "contrastive": dict(loss="contrastive", classification_weight=0.0),
}


def default_data() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from machine import data_root  # benchmarks/machine.py

    return str(data_root() / "rof_neutral")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=default_data(), help="folder of identity sub-folders")
    p.add_argument("--steps", type=int, default=150, help="training steps of every run")
    p.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=16, help="tuples (triplets or pairs) per step")
    p.add_argument("--val-identities", type=float, default=0.2, help="identities held out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", choices=BN_POLICIES, default=list(BN_POLICIES))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--out", default="runs/bn_policies", help="folder for the runs (one sub-folder per run)")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, setting: str, policy: str) -> dict:
    run_dir = Path(args.out) / f"{setting.replace('+', '_')}-{policy}"
    cfg = TrainConfig(
        data=args.data,
        image_size=list(args.image_size),
        val_identities=args.val_identities,
        batch_size=args.batch_size,
        steps=args.steps,
        bn_policy=policy,
        seed=args.seed,
        device="cpu",
        checkpoint_every=max(1, args.steps),
        out=str(run_dir),
        **SETTINGS[setting],
    )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's own summary; stdout keeps only the table
        train(cfg, overwrite=True, progress=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "setting": setting,
        "policy": policy,
        "accuracy": report["accuracy_mean"],
        "accuracy_std": report["accuracy_std"],
        "eer": report["eer"],
        "auc": report["roc_auc"],
        "n_pairs": report["n_pairs"],
        "final_loss": float(rows[-1]["loss"]),
        "train_s": float(rows[-1]["elapsed_s"]),
        "cpu_s": cpu,
        "wall_s": wall,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| setting | BN policy | held-out accuracy (10-fold) | EER | ROC AUC | final train loss | CPU s | wall s | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['policy']} | {100 * r['accuracy']:.2f}% ± {100 * r['accuracy_std']:.2f} | "
            f"{100 * r['eer']:.2f}% | {r['auc']:.4f} | {r['final_loss']:.4f} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"bn_policies: no data folder {args.data}; pass --data or set SIAMKIT_DATA", file=sys.stderr)
        return 2
    started = datetime.now()
    results = []
    for setting in args.settings:
        for policy in args.policies:
            print(f"bn_policies: {setting}, {policy} ...", file=sys.stderr, flush=True)
            results.append(run_one(args, setting, policy))
            r = results[-1]
            print(f"bn_policies: {setting}, {policy}: accuracy {r['accuracy']:.4f}, EER {r['eer']:.4f}, "
                  f"CPU {r['cpu_s']:.0f} s, wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"BatchNorm policies: ResNet18 from scratch, {args.steps} steps of {args.batch_size} tuples, "
          f"{args.image_size[0]}x{args.image_size[1]}, seed {args.seed}, {args.val_identities:g} of the identities "
          f"of {args.data} held out ({results[0]['n_pairs']} pairs)")
    print(f"{started:%Y-%m-%d %H:%M}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
