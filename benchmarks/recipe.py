"""Choosing the training recipe by measurement: candidates x seeds on AT&T and ROF-neutral.

Each candidate is a string of `siamkit train` options, resolved as the command line does (the data's
recipe first, `--recipe none` for the plain defaults). For every (candidate, seed) it trains with the
product's own `train()` and reports:
- `att`: trains on the built-in `att-train` (people s1-s30) holding out `--att-val` of them (chosen by the
  seed: a different identity-disjoint fold per seed); "val" is that fold's held-out report (what a default
  may be chosen on), "test" evaluates the unseen s31-s40 (`att-test`: all 450 genuine + 450 impostor pairs,
  10 folds), reported for every candidate but never chosen on;
- `rof`: trains on ROF-neutral with 20% of its identities held out (by the seed); "test" is that report.
Every row is the mean ± std over seeds of 10-fold accuracy, ROC AUC and TAR @ FAR 1e-2, beside the
raw-pixel baseline on the same pairs, with the wall and CPU seconds of training (decoding and the held-out
report included).

    python benchmarks/recipe.py --task att --candidates "" "--lr 3e-3" --seeds 0 1 2
    python benchmarks/recipe.py --task rof --candidates "" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from machine import data_root, describe_device  # noqa: E402
from siamkit.api import load_model  # noqa: E402
from siamkit.cli import parse_args  # noqa: E402
from siamkit.config import TrainConfig  # noqa: E402
from siamkit.data.sources import load_source  # noqa: E402
from siamkit.data.transforms import Preprocess  # noqa: E402
from siamkit.eval.protocol import evaluate  # noqa: E402
from siamkit.train.loop import train  # noqa: E402

METRICS = ("accuracy_mean", "roc_auc", "tar_1e-2", "pixels")


def config_from(options: str, data: str, out: Path, seed: int, extra: list[str]) -> TrainConfig:
    argv = ["train", "--data", data, *extra, *shlex.split(options), "--out", str(out), "--seed", str(seed)]
    return TrainConfig.from_dict(vars(parse_args(argv)))  # as `siamkit train` resolves it: --recipe auto first


def summary(report: dict) -> dict[str, float]:
    return {"accuracy_mean": report["accuracy_mean"], "roc_auc": report["roc_auc"],
            "tar_1e-2": report["tar_at_far"]["1e-2"], "pixels": report["baseline"]["accuracy_mean"]}


def run_one(task: str, options: str, seed: int, work: Path, args) -> dict:
    out = work / f"{task}-{abs(hash(options))}-{seed}"
    if task == "att":
        cfg = config_from(options, args.att_train, out, seed, ["--val-identities", str(args.att_val)])
    else:
        cfg = config_from(options, str(args.rof), out, seed, ["--val-identities", "0.2"])
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg, progress=False)
    row = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    import json

    val = json.loads((out / "eval" / "report.json").read_text()) if (out / "eval" / "report.json").exists() else None
    if task == "att":
        model, ckpt = load_model(out, "cpu")
        pre = Preprocess.from_dict(ckpt["preprocess"])
        test = evaluate(model, pre, load_source(args.att_test, pre), score=ckpt["score"], flip=cfg.eval_flip,
                        shifts=cfg.eval_shifts).report
        row["val"] = summary(val) if val else None
    else:
        test = val
    row["test"] = summary(test)
    return row


def fmt(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def main() -> None:
    default_data = data_root()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("att", "rof"), default="att")
    p.add_argument("--candidates", nargs="+", default=[""], help="siamkit train options, one string per candidate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--att-val", type=int, default=6, help="att: identities of s1-s30 held out for validation")
    p.add_argument("--att-train", default="att-train",
                   help="att: the s1-s30 data (default the built-in att-train; e.g. a folder aligned by siamkit align)")
    p.add_argument("--att-test", default="att-test", help="att: the s31-s40 data, as --att-train")
    p.add_argument("--rof", type=Path, default=default_data / "rof_neutral")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recipe_"))
    print(f"### {args.task}: {describe_device('cpu')}, torch {torch.__version__}, "
          f"seeds {args.seeds}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    what = "s31-s40 (test)" if args.task == "att" else "held-out 20% of identities"
    head = f"| options | {what}: 10-fold accuracy % | AUC | TAR @ FAR 1e-2 % | pixels: accuracy % | model - pixels (points) |"
    if args.task == "att":
        head += f" val ({args.att_val} of s1-s30): accuracy % |"
    print(head + " train wall s | train CPU s |")
    print("|" + "---|" * (head.count("|") + 1))
    for options in args.candidates:
        rows = []
        for seed in args.seeds:
            rows.append(run_one(args.task, options, seed, work, args))
            t = rows[-1]["test"]
            print(f"<!-- {options or '(defaults)'} seed {seed}: test {t['accuracy_mean']:.4f} pixels {t['pixels']:.4f} "
                  f"val {rows[-1].get('val', {}) and rows[-1]['val']['accuracy_mean']} wall {rows[-1]['wall']:.0f} s -->",
                  flush=True)
        test = {k: [r["test"][k] for r in rows] for k in METRICS}
        gain = [a - b for a, b in zip(test["accuracy_mean"], test["pixels"])]
        line = (f"| `{options or '(defaults)'}` | {fmt(test['accuracy_mean'])} | {fmt(test['roc_auc'], False)} | "
                f"{fmt(test['tar_1e-2'])} | {fmt(test['pixels'])} | {100 * min(gain):+.1f} (worst seed) .. "
                f"{100 * statistics.mean(gain):+.1f} (mean) |")
        if args.task == "att":
            vals = [r["val"]["accuracy_mean"] for r in rows if r["val"]]
            line += f" {fmt(vals) if vals else '-'} |"
        walls, cpus = [r["wall"] for r in rows], [r["cpu"] for r in rows]
        print(line + f" {statistics.mean(walls):.0f} (max {max(walls):.0f}) | {statistics.mean(cpus):.0f} |", flush=True)


if __name__ == "__main__":
    main()
