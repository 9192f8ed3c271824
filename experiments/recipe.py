"""Choosing the training recipe by measurement: candidates x seeds on AT&T and ROF-neutral.

Each candidate is a string of `siamkit train` options, resolved as the command line does (the data's
recipe first, `--recipe none` for the plain defaults). For every (candidate, seed) it trains with the
product's own `train()` and reports:
- `att`: trains on the built-in `att-train` (people s1-s30) holding out `--att-val` of them (chosen by the
  seed: a different identity-disjoint fold per seed); "val" is that fold's held-out report (what a default
  may be chosen on), "test" evaluates the unseen s31-s40 (`att-test`: all 450 genuine + 450 impostor pairs,
  10 folds), reported for every candidate but never chosen on;
- `rof`: trains on ROF-neutral with 20% of its identities held out (by the seed); "test" is that report.
  With `--rof-val F` it also validates: it trains on the other 80% only, holding out the fraction F of them
  (by the seed) as "val" (what a default may be chosen on), and "test" evaluates the seed's 20% (the same
  people as without `--rof-val`), reported but never chosen on.
`--reference MODEL` (e.g. `dlib`, a built-in model) adds a row for a model used as it is, evaluated on the
same val and test pairs as the candidates (each report is computed with the same function and seed).
Every row is the mean ± std over seeds of 10-fold accuracy, ROC AUC and TAR @ FAR 1e-2, beside the
raw-pixel baseline on the same pairs, with the wall and CPU seconds of training (decoding and the held-out
report included).

    python experiments/recipe.py --task att --candidates "" "--lr 3e-3" --seeds 0 1 2
    python experiments/recipe.py --task rof --candidates "" --seeds 0 1 2
    python experiments/recipe.py --task rof --rof-val 0.2 --reference dlib --candidates "--pretrained dlib"
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
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/machine.py

import torch  # noqa: E402

from machine import data_root, describe_device  # noqa: E402
from siamkit.api import load_model, run_flip, run_shifts  # noqa: E402
from siamkit.cli import parse_args  # noqa: E402
from siamkit.config import TrainConfig  # noqa: E402
from siamkit.data.sources import load_source, split_identities  # noqa: E402
from siamkit.data.transforms import Preprocess  # noqa: E402
from siamkit.eval.protocol import evaluate  # noqa: E402
from siamkit.faces.chip_data import chip_folder  # noqa: E402
from siamkit.faces.chips import is_dlib_chip  # noqa: E402
from siamkit.train.loop import train  # noqa: E402

METRICS = ("accuracy_mean", "roc_auc", "tar_1e-2", "pixels")


def config_from(options: str, data: str, out: Path, seed: int, extra: list[str]) -> TrainConfig:
    argv = ["train", "--data", data, *extra, *shlex.split(options), "--out", str(out), "--seed", str(seed)]
    return TrainConfig.from_dict(vars(parse_args(argv)))  # as `siamkit train` resolves it: --recipe auto first


def summary(report: dict) -> dict[str, float]:
    return {"accuracy_mean": report["accuracy_mean"], "roc_auc": report["roc_auc"],
            "tar_1e-2": report["tar_at_far"]["1e-2"], "pixels": report["baseline"]["accuracy_mean"]}


def rof_split(rof: Path, seed: int, work: Path) -> tuple[Path, Path]:
    """The `rof` task's split for ``seed`` as two folders of links: its training people and its held-out people.

    The split is the one training makes (split_identities over the folder's identities, 20%), so the held-out
    people are the same with or without --rof-val.
    """
    everyone = load_source(str(rof), Preprocess(image_size=(8, 8), channels=1))  # only its identities are used
    train_part, test_part = split_identities(everyone, 0.2, seed)
    folders = []
    for part, tag in ((train_part, "train"), (test_part, "test")):
        folder = work / f"rof-{tag}-seed{seed}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for name in part.names:
                (folder / name).symlink_to((rof / name).resolve())
            if (rof / "align_report.json").is_file():  # a folder of chips (siamkit align) stays one
                (folder / "align_report.json").symlink_to((rof / "align_report.json").resolve())
        folders.append(folder)
    return folders[0], folders[1]


def trained_model(task: str, options: str, seed: int, work: Path, args) -> tuple[Path, dict]:
    """Train one candidate as `siamkit train` would; returns its run folder and the wall and CPU seconds."""
    out = work / f"{task}-{abs(hash(options))}-{seed}"
    if task == "att":
        cfg = config_from(options, args.att_train, out, seed, ["--val-identities", str(args.att_val)])
    elif args.rof_val:
        cfg = config_from(options, str(rof_split(args.rof, seed, work)[0]), out, seed,
                          ["--val-identities", str(args.rof_val)])
    else:
        cfg = config_from(options, str(args.rof), out, seed, ["--val-identities", "0.2"])
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg, progress=False)
    return out, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def measured(model_path: str | Path, task: str, seed: int, work: Path, args) -> dict:
    """The model's val and test reports for ``seed`` (val: None where the task has none)."""
    model, ckpt = load_model(model_path, "cpu")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    flip, shifts = run_flip(ckpt), run_shifts(ckpt)

    def data(source: str | Path):
        """The source as the model reads it (dlib's face chips, cut once into the cache, for dlib's models)."""
        return load_source(chip_folder(str(source)) if is_dlib_chip(ckpt.get("alignment")) else str(source), pre)

    def report(ds) -> dict:
        return summary(evaluate(model, pre, ds, score=ckpt["score"], flip=flip, shifts=shifts, seed=seed).report)

    if task == "att":
        val_ds = split_identities(data(args.att_train), args.att_val, seed)[1]
        return {"val": report(val_ds), "test": report(data(args.att_test))}
    if args.rof_val:
        train_folder, test_folder = rof_split(args.rof, seed, work)
        val_ds = split_identities(data(train_folder), args.rof_val, seed)[1]
        return {"val": report(val_ds), "test": report(data(test_folder))}
    test_ds = split_identities(data(args.rof), 0.2, seed)[1]
    return {"val": None, "test": report(test_ds)}


def run_one(task: str, options: str | None, seed: int, work: Path, args) -> dict:
    """One candidate (``options``) trained and measured, or the reference model (``options`` None) measured."""
    if options is None:
        return {"wall": 0.0, "cpu": 0.0, **measured(args.reference, task, seed, work, args)}
    out, row = trained_model(task, options, seed, work, args)
    return {**row, **measured(out, task, seed, work, args)}


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
    p.add_argument("--rof-val", type=float, default=0.0,
                   help="rof: train on the seed's 80%% only, holding out this fraction of them as val")
    p.add_argument("--reference", default=None, help="a model used as it is (e.g. dlib), measured on the same pairs")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recipe_"))
    print(f"### {args.task}: {describe_device('cpu')}, torch {torch.__version__}, "
          f"seeds {args.seeds}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    what = "s31-s40 (test)" if args.task == "att" else "held-out 20% of identities (test)"
    val_what = f"{args.att_val} of s1-s30" if args.task == "att" else f"{args.rof_val:g} of the other 80%"
    has_val = args.task == "att" or bool(args.rof_val)
    head = f"| options | {what}: 10-fold accuracy % | AUC | TAR @ FAR 1e-2 % | pixels: accuracy % | model - pixels (points) |"
    if has_val:
        head += f" val ({val_what}): accuracy % |"
    print(head + " train wall s | train CPU s |")
    print("|" + "---|" * (head.count("|") + 1))
    for options in ([None] if args.reference else []) + args.candidates:
        label = f"{args.reference} (as it is)" if options is None else options or "(defaults)"
        rows = []
        for seed in args.seeds:
            rows.append(run_one(args.task, options, seed, work, args))
            t = rows[-1]["test"]
            print(f"<!-- {label} seed {seed}: test {t['accuracy_mean']:.4f} pixels {t['pixels']:.4f} "
                  f"val {rows[-1]['val'] and rows[-1]['val']['accuracy_mean']} wall {rows[-1]['wall']:.0f} s -->",
                  flush=True)
        test = {k: [r["test"][k] for r in rows] for k in METRICS}
        gain = [a - b for a, b in zip(test["accuracy_mean"], test["pixels"])]
        line = (f"| `{label}` | {fmt(test['accuracy_mean'])} | {fmt(test['roc_auc'], False)} | "
                f"{fmt(test['tar_1e-2'])} | {fmt(test['pixels'])} | {100 * min(gain):+.1f} (worst seed) .. "
                f"{100 * statistics.mean(gain):+.1f} (mean) |")
        if has_val:
            vals = [r["val"]["accuracy_mean"] for r in rows if r["val"]]
            line += f" {fmt(vals) if vals else '-'} |"
        walls, cpus = [r["wall"] for r in rows], [r["cpu"] for r in rows]
        print(line + f" {statistics.mean(walls):.0f} (max {max(walls):.0f}) | {statistics.mean(cpus):.0f} |", flush=True)


if __name__ == "__main__":
    main()
