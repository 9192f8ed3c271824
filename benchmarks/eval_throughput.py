"""Evaluation speed: embedding extraction against the bare forward pass, and scoring 6,000 pairs.

Extraction is siamkit.eval.embed.embed_images (uint8 images in memory -> normalise -> model.embed in
eval mode, batches of 256 -> float32 numpy), the path `siamkit evaluate`, `siamkit embed` and the API
take. Forward-only is model.embed on the same images already normalised and on the device, under
torch.inference_mode, in the same batches: the most the extraction could reach. Both run in the same
process, alternating, round after round; each figure is its fastest round.

Scoring: 6,000 pairs (LFW's count: 10 folds of 300 genuine + 300 impostor) of 128-d embeddings
-> siamkit.eval.verification.pair_scores (cosine) + verification_report (ROC AUC, EER, TAR@FAR,
10-fold accuracy, threshold): the fastest of several repetitions.

    PYTHONPATH=src python benchmarks/eval_throughput.py [--device cpu|cuda] [--sizes 64 112]
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import describe_device  # noqa: E402  (benchmarks/machine.py)
from siamkit.data.transforms import Preprocess, normalize  # noqa: E402
from siamkit.eval.embed import embed_images  # noqa: E402
from siamkit.eval.verification import pair_scores, verification_report  # noqa: E402
from siamkit.models.siamese import ModelSpec, SiameseNet  # noqa: E402

BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def extraction(size: int, n_images: int, rounds: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SiameseNet(ModelSpec(backbone="resnet18")).to(device).to(memory_format=torch.channels_last).eval()
    pre = Preprocess((size, size))
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 3, size, size), generator=g, dtype=torch.uint8)
    ready = [normalize(images[i : i + BATCH].to(device), pre, channels_last=True) for i in range(0, n_images, BATCH)]

    def forward_only() -> None:
        with torch.inference_mode():
            for x in ready:
                model.embed(x)

    def extract() -> None:
        embed_images(model, images, pre, device, batch_size=BATCH)

    forward_only(), extract()  # warm-up (oneDNN / cuDNN pick their kernels)
    best = {"forward": float("inf"), "extract": float("inf")}
    for _ in range(rounds):
        for name, fn in (("forward", forward_only), ("extract", extract)):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return {k: n_images / v for k, v in best.items()}


def scoring(n_pairs: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    n_ids, per_id, dim = 500, 12, 128
    # Embeddings with identity structure (a centre per identity plus noise), l2-normalised, so that the
    # metrics have a real ROC to compute.
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = (centres[labels] + 0.8 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    half = n_pairs // 2
    ids = rng.integers(0, n_ids, half)
    a_gen = ids * per_id + rng.integers(0, per_id, half)
    b_gen = ids * per_id + (a_gen % per_id + rng.integers(1, per_id, half)) % per_id
    a_imp = rng.integers(0, len(labels), n_pairs - half)
    b_imp = (a_imp + per_id * rng.integers(1, n_ids, n_pairs - half)) % len(labels)
    idx_a, idx_b = np.concatenate([a_gen, a_imp]), np.concatenate([b_gen, b_imp])
    same = np.concatenate([np.ones(half, bool), np.zeros(n_pairs - half, bool)])
    folds = np.concatenate([np.arange(half) % 10, np.arange(n_pairs - half) % 10])
    assert np.array_equal(labels[idx_a] == labels[idx_b], same)

    best = {"scores": float("inf"), "report": float("inf"), "total": float("inf")}
    report = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = pair_scores(emb[idx_a], emb[idx_b], "cosine")
        t1 = time.perf_counter()
        report = verification_report(scores, same, folds, "cosine")
        t2 = time.perf_counter()
        best["scores"] = min(best["scores"], t1 - t0)
        best["report"] = min(best["report"], t2 - t1)
        best["total"] = min(best["total"], t2 - t0)
    return {**best, "roc_auc": report["roc_auc"], "n_pairs": report["n_pairs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    p.add_argument("--images", type=int, default=None, help="images per round (default: 1024 on CPU, 8192 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: 8 on CPU, 3 on CUDA)")
    p.add_argument("--pairs", type=int, default=6000)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: PyTorch sees no CUDA GPU", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    n_images = args.images or (8192 if device.type == "cuda" else 1024)
    # CPU rounds vary by about 10% on a shared VM: more of them for a stable best.
    args.rounds = args.rounds or (3 if device.type == "cuda" else 8)

    started = time.perf_counter()
    rows = {size: extraction(size, n_images, args.rounds, device) for size in args.sizes}
    score = scoring(args.pairs, repeats=10)

    print(f"\n### Evaluation speed ({args.device}: {describe_device(device.type)})\n")
    print(
        f"torch {torch.__version__}; ResNet18 + 128-d l2 embedding, eval mode, batches of {BATCH}, {n_images} "
        f"images per round, fastest of {args.rounds} alternating rounds; {datetime.now():%Y-%m-%d %H:%M}.\n"
    )
    print("| size | forward only, images/s | embed_images, images/s | extraction ÷ forward |")
    print("|---|---:|---:|---:|")
    for size, r in rows.items():
        print(f"| {size}x{size} | {r['forward']:,.1f} | {r['extract']:,.1f} | {r['extract'] / r['forward']:.0%} |")
    print(
        f"\nScoring {score['n_pairs']:,} pairs (10 folds; ROC AUC of this synthetic set {score['roc_auc']:.3f}), "
        f"CPU, fastest of 10:\n"
    )
    print("| step | time |")
    print("|---|---:|")
    print(f"| pair_scores (cosine) | {score['scores'] * 1e3:.2f} ms |")
    print(f"| verification_report (AUC, EER, TAR@FAR x3, 10-fold accuracy, threshold) | {score['report'] * 1e3:.2f} ms |")
    print(f"| total | {score['total'] * 1e3:.2f} ms |")
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
