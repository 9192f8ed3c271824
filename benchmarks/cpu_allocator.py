"""CPU training step with the allocator part of `--cpu-tuning auto` (the default) against malloc left alone, paired step by step.

The same step as train_throughput.py's row 3 (ResNet18, triplet loss + classifier, 32 triplets = 96
images, fp32, siamkit defaults) runs in two worker processes that differ only in the allocator
setting (siamkit/accel.py, keep_freed_memory). They take turns one step at a time (every other round in
reverse order) and the speed-up is the median over rounds of the ratio of the two step times of
that round: this VM's speed drifts by 10-20% over minutes, which a pair of steps a few seconds apart
shares. Also printed per setting: median and fastest step, system CPU seconds and minor page faults
per step (the kernel work the cached setting removes), and peak memory (the worker's peak resident
set minus its resident set before the model was built, as in train_throughput.py).

    PYTHONPATH=src python benchmarks/cpu_allocator.py                # 64x64 and 112x112, 16 rounds
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import TRIPLETS, Worker, _fmt_mem  # noqa: E402

SETTINGS = {"siamkit": "cached (default)", "sysalloc": "system"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    p.add_argument("--rounds", type=int, default=16, help="paired rounds of one step per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = p.parse_args(argv)

    import torch

    from machine import describe_device

    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    lines = [
        f"### CPU allocator: cached vs system ({describe_device('cpu')})",
        "",
        f"torch {torch.__version__}; ResNet18, 96 images/step, fp32, siamkit defaults; {args.rounds} paired rounds "
        f"of one step each; {datetime.now():%Y-%m-%d %H:%M}",
        "",
        "| input | allocator | median step | fastest step | system CPU/step | minor faults/step | peak memory "
        "| speed-up (median of paired ratios) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for size in args.sizes:
        workers = {row: Worker(ctx, row, size, "cpu", args.warmup) for row in SETTINGS}
        for w in workers.values():  # one after another: warm-ups must not fight over the cores
            w.wait_ready()
            if w.error:
                print(f"{size}x{size} {w.row}: {w.error}", file=sys.stderr)
                return 1
        order = list(workers.values())
        for r in range(args.rounds):
            for w in order if r % 2 == 0 else order[::-1]:
                w.run(1)
        peaks = {row: w.memory() for row, w in workers.items()}
        for w in workers.values():
            w.stop()
            if w.error:
                print(f"{size}x{size} {w.row}: {w.error}", file=sys.stderr)
                return 1
        cached, system = workers["siamkit"], workers["sysalloc"]
        ratios = [s / c for c, s in zip(cached.times, system.times)]
        wins = sum(x > 1 for x in ratios)
        for row, w in workers.items():
            speedup = f"**{statistics.median(ratios):.3f}x** (faster in {wins}/{len(ratios)} rounds)" if row == "siamkit" else "1"
            lines.append(
                f"| {size}x{size} | {SETTINGS[row]} | {statistics.median(w.times):.3f} s | {min(w.times):.3f} s "
                f"| {statistics.median(w.system):.3f} s | {statistics.median(w.faults):,.0f} | {_fmt_mem(peaks[row])} "
                f"| {speedup} |"
            )
        print(f"  done: {size}x{size} ({3 * TRIPLETS} images/step)", file=sys.stderr)
    lines += ["", f"Whole run: {(time.perf_counter() - started) / 60:.1f} min."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
