"""Where a training step's time goes on CPU: siamkit's step (row 3 of train_throughput.py) by kind of operation.

The same set-up as benchmarks/train_throughput.py's row 3 (the product's build_training and
optimisation_step: ResNet18, 32 triplets = 96 images, triplet loss + softmax classifier, channels-last,
--cpu-tuning auto) on the same synthetic batches, profiled with torch.profiler over a few steps after
warm-up steps. Each aten operation's own time (self CPU time, so nested calls are not counted twice) is
put in one group: convolution forward, convolution backward (input and weight gradients together, as
oneDNN computes them in one call, or the swapped weight gradient where it was picked), BatchNorm forward and
backward, ReLU forward and backward, the residual additions, the classifier and loss, the optimizer, and
the rest. Per convolution shape, benchmarks/conv_weight_grad.py has the forward and weight-gradient times.

    PYTHONPATH=src python benchmarks/profile_step.py                 # 64x64 and 112x112
    PYTHONPATH=src python benchmarks/profile_step.py --sizes 112 --steps 5
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as tt  # noqa: E402
from machine import describe_device  # noqa: E402

# (group, substrings of aten op names), first match wins; order matters (backward before forward names).
GROUPS = (
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward")),
    ("convolution forward", ("convolution", "conv2d")),
    ("BatchNorm backward", ("batch_norm_backward",)),
    ("BatchNorm forward", ("batch_norm",)),
    ("ReLU backward", ("threshold_backward",)),
    ("ReLU forward", ("relu",)),
    ("optimizer (Adam)", ("_foreach", "_fused_adam", "adam")),
    ("residual additions", ("aten::add",)),
    ("copies and layout changes", ("copy_", "contiguous", "clone", "to_copy", "empty_strided")),
    ("matrix products (heads, loss)", ("addmm", "mm", "bmm", "linear", "matmul")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def profile(size: int, steps: int, warmup: int) -> tuple[dict[str, float], float, str]:
    """(ms per step by group, ms per step in all, the tuning line) for row 3 at size x size."""
    device = torch.device("cpu")
    data = tt._Data(size, device)
    row = tt._Siamkit("siamkit", data, device, size)
    for step in range(warmup):
        row.step(step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for step in range(warmup, warmup + steps):
            row.step(step)
    by_group: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("mkldnn"):
            by_group[group_of(event.key)] += event.self_cpu_time_total / 1e3 / steps
        elif event.self_cpu_time_total > 0 and not event.key.startswith("ProfilerStep"):
            by_group["other"] += event.self_cpu_time_total / 1e3 / steps
    total = sum(by_group.values())
    return dict(by_group), total, row.training.tuning_note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(f"### Where siamkit's CPU step spends its time ({describe_device('cpu')})\n\ntorch {torch.__version__}; train_throughput.py's row 3 (ResNet18, {tt.TRIPLETS} triplets = "
          f"{3 * tt.TRIPLETS} images, triplet + softmax classifier); self CPU time per step, mean of {args.steps} "
          f"profiled steps after {args.warmup} warm-up steps, under torch.profiler (which adds a little time per "
          f"operation); {datetime.now():%Y-%m-%d %H:%M}.\n")
    results = {size: profile(size, args.steps, args.warmup) for size in args.sizes}
    groups = [g for g, _ in GROUPS] + ["other"]
    print("| group | " + " | ".join(f"{s}x{s}: ms/step (share)" for s in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    for g in groups:
        cells = [f"{r[0].get(g, 0.0):,.1f} ({r[0].get(g, 0.0) / r[1]:.0%})" for r in results.values()]
        print(f"| {g} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"**{r[1]:,.1f}**" for r in results.values()) + " |")
    for size, (_, _, note) in results.items():
        if note:
            print(f"\n{size}x{size}: {note}")


if __name__ == "__main__":
    main()
