"""Cost against data set size: decode once, start from the cache, train in flat memory.

For synthetic folders of 112x112 JPEG faces-like images (20 per identity, deterministic, written once under
--root), each size gets, in fresh processes so that nothing is warm but the OS file cache:
  * first-run decode: the decoded cache built from the JPEGs (worker processes on every core);
  * cached start-up: the same data loaded again (folder listing, fingerprint, memory map);
  * training: ``siamkit train`` streaming from the cache (--data-in-memory no) for --steps steps, with its
    peak anonymous resident memory (RssAnon of /proc/PID/status, polled every 20 ms: the process's own
    memory, not the page cache of the memory-mapped file) and images/s from its metrics.csv (steps after the
    first, which includes start-up);
  * optionally (--in-memory-up-to N) the same training with --data-in-memory yes, for contrast;
  * optionally (--evaluate SIZE) ``siamkit evaluate`` of the trained model on the whole folder of that size
    (every image held out), with its peak anonymous memory.
It also states what the identity classifier head costs at 100,000 identities.

    python benchmarks/data_scale.py --sizes 1000 10000 100000 --root /tmp/siamkit_scale
    python benchmarks/data_scale.py --sizes 1000 10000 100000 300000 --evaluate 100000 --out benchmarks/results/data_scale_cpu.md
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PER_IDENTITY = 20
SIDE = 112
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --- synthetic folders ----------------------------------------------------------------------------------


def _write_identities(task: tuple[str, int, int]) -> int:
    """Images of identities [start, stop): a smooth random 'face' per identity, shifted and noised per image."""
    from PIL import Image

    root, start, stop = task
    for ident in range(start, stop):
        rng = np.random.default_rng([7, ident])
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        face = np.asarray(Image.fromarray(coarse).resize((SIDE + 16, SIDE + 16), Image.BICUBIC), dtype=np.int16)
        folder = Path(root) / f"id{ident:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(PER_IDENTITY):
            dy, dx = rng.integers(0, 17, 2)
            img = face[dy:dy + SIDE, dx:dx + SIDE] + rng.integers(-25, 26, (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{k:02d}.jpg", quality=90)
    return (stop - start) * PER_IDENTITY


def make_folder(root: Path, n_images: int) -> Path:
    """The folder of ``n_images`` (written once: a marker file says it is complete)."""
    folder = root / f"faces_{n_images}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    n_ids = n_images // PER_IDENTITY
    step = 50
    tasks = [(str(folder), s, min(n_ids, s + step)) for s in range(0, n_ids, step)]
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        done = sum(pool.map(_write_identities, tasks))
    marker.write_text(f"{done}\n")
    print(f"wrote {done} JPEGs to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


# --- measurements -----------------------------------------------------------------------------------------

_LOAD = """
import sys, time
t = time.perf_counter()
from siamkit.data.cache import load_data
from siamkit.data.transforms import Preprocess
imported = time.perf_counter()
ds = load_data(sys.argv[1], Preprocess((112, 112)), sys.argv[2], progress=False)
print(len(ds), time.perf_counter() - imported)
"""


def timed_load(folder: Path, cache_dir: Path) -> tuple[int, float]:
    """(images, seconds) of load_data in a fresh process, not counting Python's and torch's import."""
    out = subprocess.run([sys.executable, "-c", _LOAD, str(folder), str(cache_dir)], env=ENV, capture_output=True,
                         text=True, check=True)
    n, seconds = out.stdout.split()
    return int(n), float(seconds)


def peak_anon_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RssAnon in MiB, wall seconds) of a command, polled from /proc every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(line for line in status.splitlines() if line.startswith("RssAnon")).split()[1]))
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return peak / 1024, time.perf_counter() - start


def train_cmd(folder: Path, cache_dir: Path, out: Path, steps: int, in_memory: str, side: int = SIDE) -> list[str]:
    return [sys.executable, "-m", "siamkit", "train", "--data", str(folder), "--cache-dir", str(cache_dir),
            "--image-size", str(side), str(side), "--data-in-memory", in_memory, "--steps", str(steps),
            "--val-identities", "0", "--device", "cpu", "--log-every", "1", "--checkpoint-every", str(steps),
            "--no-progress", "--out", str(out), "--overwrite"]


def images_per_s(run: Path) -> float:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    later = rows[1:] or rows  # the first step includes start-up
    return float(np.median([float(r["images_per_s"]) for r in later]))


def classifier_memory(n_classes: int = 100_000) -> str:
    """The classifier head of the faces recipe at ``n_classes`` identities: its weights, and what training adds."""
    import torch

    from siamkit.config import RECIPES, TrainConfig
    from siamkit.models.heads import build_classifier

    cfg = TrainConfig(**RECIPES["faces"])
    head = build_classifier(cfg.classifier, cfg.embedding_dim, n_classes, cfg.scale, cfg.class_margin)
    weights = sum(p.numel() * p.element_size() for p in head.parameters())
    batch = cfg.identities_per_batch * cfg.images_per_identity
    logits = batch * n_classes * torch.tensor([], dtype=torch.float32).element_size()
    return (f"classifier head ({cfg.classifier}, {cfg.embedding_dim}-d embedding) at {n_classes:,} identities: "
            f"{weights / 2**20:.1f} MiB of weights; with its gradient and AdamW's two moments "
            f"{4 * weights / 2**20:.1f} MiB; logits of a {batch}-image batch {logits / 2**20:.1f} MiB "
            f"(and as much again for their gradient)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 300000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/siamkit_data_scale"),
                        help="where the synthetic folders and their caches go (written once, reused)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--in-memory-up-to", type=int, default=0,
                        help="also train with --data-in-memory yes for sizes up to this many images")
    parser.add_argument("--evaluate", type=int, default=0, help="evaluate the run on the folder of this size")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import describe_device

    lines = [f"machine: {describe_device('cpu')}; `OMP_NUM_THREADS={ENV['OMP_NUM_THREADS']}`", "",
             "| images | identities | decoded cache | first-run decode | cached start-up | decode / start-up "
             "| training peak anon. memory (streamed) | training images/s | in memory: peak anon. memory |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        folder = make_folder(args.root, n)
        cache_dir = args.root / f"cache_{n}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        count, decode_s = timed_load(folder, cache_dir)
        _, start_s = timed_load(folder, cache_dir)
        run = args.root / f"run_{n}"
        peak, _ = peak_anon_rss(train_cmd(folder, cache_dir, run, args.steps, "no"))
        speed = images_per_s(run)
        in_memory = "-"
        if n <= args.in_memory_up_to:
            peak_mem, _ = peak_anon_rss(train_cmd(folder, cache_dir, args.root / f"run_{n}_mem", args.steps, "yes"))
            in_memory = f"{peak_mem:,.0f} MiB"
        size = sum(p.stat().st_size for p in cache_dir.rglob("images.u8")) / 2**30
        row = (f"| {count:,} | {count // PER_IDENTITY:,} | {size:.2f} GiB | {decode_s:.1f} s | {start_s:.2f} s "
               f"| {decode_s / start_s:.0f}x | {peak:,.0f} MiB | {speed:.0f} | {in_memory} |")
        lines.append(row)
        print(row, flush=True)
    if args.evaluate:
        # A model of the faces recipe's own input size (32x32): embedding 100,000 images at 112x112 on two
        # CPU cores would take most of an hour; the evaluation's memory does not depend on the model.
        run = args.root / "run_eval_model"
        eval_cache = args.root / "cache_eval"
        peak_anon_rss(train_cmd(make_folder(args.root, args.sizes[0]), eval_cache, run, 1, "no", side=32))
        folder = make_folder(args.root, args.evaluate)
        out = args.root / f"eval_{args.evaluate}"
        cmd = [sys.executable, "-m", "siamkit", "evaluate", str(run), "--data", str(folder), "--cache-dir",
               str(eval_cache), "--device", "cpu", "--no-flip", "--out", str(out)]
        _, decode_s = peak_anon_rss(cmd)  # the first evaluation decodes the folder at 32x32 into the cache
        peak, wall = peak_anon_rss(cmd)
        report = json.loads((out / "report.json").read_text())
        sampled = report.get("pair_sampling", {}).get("genuine_available", report["n_genuine"])
        line = (f"`siamkit evaluate` (default protocol, 32x32 model, no flip) on {args.evaluate:,} held-out images, "
                f"cache built: {report['n_pairs']:,} pairs ({report['n_genuine']:,} genuine drawn from {sampled:,}), "
                f"peak anonymous memory {peak:,.0f} MiB, {wall:.0f} s (first run, decoding too: {decode_s:.0f} s)")
        lines += ["", line]
        print(line, flush=True)
    lines += ["", classifier_memory()]
    print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/data_scale.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Cost against data set size\n\n`{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
