"""Held-out verification accuracy on the AT&T faces: train on s1-s30, evaluate on s31-s40.

Each configuration is a string of `siamkit train` options; every row trains a fresh run with them
and evaluates the 10 unseen people (all 450 genuine pairs + 450 impostor pairs, 10 folds).

    python benchmarks/att_faces_accuracy.py                       # siamkit's defaults
    python benchmarks/att_faces_accuracy.py --configs "" "--steps 300" "--loss contrastive"
"""
from __future__ import annotations

import argparse
import os
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
from siamkit.data.sources import load_folder  # noqa: E402
from siamkit.data.transforms import Preprocess  # noqa: E402
from siamkit.eval.protocol import evaluate  # noqa: E402
from siamkit.api import load_model  # noqa: E402
from siamkit.train.loop import train  # noqa: E402


def split_att(att: Path, work: Path) -> tuple[Path, Path]:
    """Symlinked train (s1-s30) and test (s31-s40) folders."""
    train_dir, test_dir = work / "train", work / "test"
    for d in (train_dir, test_dir):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(1, 41):
        link = (train_dir if i <= 30 else test_dir) / f"s{i}"
        if not link.exists():
            link.symlink_to(att / f"s{i}")
    return train_dir, test_dir


def config_from(options: str, data: Path, out: Path, device: str, seed: int | None) -> TrainConfig:
    args = build_parser().parse_args(["train", *shlex.split(options), "--data", str(data), "--out", str(out)])
    cfg = TrainConfig.from_dict(vars(args))
    if device != "auto":
        cfg.device = device
    if seed is not None:
        cfg.seed = seed
    return cfg


def main() -> None:
    default_data = Path(os.environ.get("SIAMKIT_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--att", type=Path, default=default_data / "att_faces")
    p.add_argument("--configs", nargs="+", default=[""], help="siamkit train options, one string per row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--flip", action="store_true", help="evaluate with mirrored-image embeddings added")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="att_accuracy_"))
    train_dir, test_dir = split_att(args.att.resolve(), work)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() and args.device != 'cpu' else ''}")
    print("| options | seed | steps | held-out 10-fold accuracy | EER | ROC AUC | train wall s | train CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for options in args.configs:
        for seed in args.seeds:
            out = work / f"run{abs(hash((options, seed)))}"
            cfg = config_from(options, train_dir, out, args.device, seed)
            wall, cpu = time.perf_counter(), time.process_time()
            train(cfg, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            model, ckpt = load_model(out, "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
            pre = Preprocess.from_dict(ckpt["preprocess"])
            report = evaluate(model, pre, load_folder(test_dir, pre), score=ckpt["score"], flip=args.flip,
                                    device=next(model.parameters()).device).report
            steps = ckpt["step"]
            print(f"| `{options or '(defaults)'}` | {seed} | {steps} | {report['accuracy_mean']:.4f} ± "
                  f"{report['accuracy_std']:.4f} | {report['eer']:.4f} | {report['roc_auc']:.4f} | {wall:.0f} | {cpu:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
