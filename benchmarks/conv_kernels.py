"""Convolutions in training on CPU: each candidate of measure-and-pick (`--cpu-tuning auto`), per ResNet18 shape.

For every distinct convolution of ResNet18 at the given input sizes, batch 96 (32 triplets), channels-last
fp32 as siamkit trains: the training work of the layer (forward, input and weight gradients:
siamkit.kernel_choice.candidate_calls, the calls the tuning times) by each candidate that computes it:
PyTorch's own (oneDNN), PyTorch's with the swapped weight gradient, Winograd F(2x2, 3x3) and F(4x4, 3x3)
(3x3 stride-1 layers only). In ms per call (mean of --reps calls, fastest of --rounds interleaved rounds)
and in GFLOP/s of the direct convolution's arithmetic (3 x its forward's: what the call does by the
textbook, so that Winograd's rate reads above the machine's where it does less arithmetic).
"picked" is what `--cpu-tuning auto` chooses on this machine: kernel_choice.choose run afresh (no cache)
on the same shapes, its own measurement, as a training run without a cache does it. The totals are per
training step (each shape times its count; the first layer's input gradient, which training does not
compute, is in every candidate's time alike). The process keeps freed memory (accel.keep_freed_memory),
as CPU training does: without it every call would map its buffers in afresh.

    PYTHONPATH=src python benchmarks/conv_kernels.py                 # 64x64 and 112x112
    PYTHONPATH=src python benchmarks/conv_kernels.py --sizes 112 --rounds 5
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torchvision.models import resnet18

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from conv_weight_grad import seconds_per_call  # noqa: E402
from machine import describe_device  # noqa: E402
from siamkit import kernel_choice  # noqa: E402
from siamkit.accel import keep_freed_memory  # noqa: E402
from siamkit.kernel_choice import KERNELS, PYTORCH, candidate_calls, conv_shapes  # noqa: E402

BATCH = 96
LABEL = {"pytorch": "PyTorch", "swapped": "swapped wgrad", "winograd2": "Winograd F(2,3)", "winograd4": "Winograd F(4,3)"}


def resnet18_shapes(size: int) -> dict:
    """{ConvShape at batch BATCH: how many layers have it} for ResNet18 on size x size channels-last images."""
    model = resnet18().to(memory_format=torch.channels_last)
    x = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        found = conv_shapes(model.eval(), lambda: model(x))
    return {type(s)(**{**s.__dict__, "input": (BATCH, *s.input[1:])}): n for s, n in found.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="calls per round")
    args = ap.parse_args(argv)
    keep_freed_memory()

    print(f"### Convolutions in training, by kernel ({describe_device('cpu')})\n")
    print(
        f"torch {torch.__version__}; ResNet18, batch {BATCH}, channels-last, fp32; forward + input and weight "
        f"gradients per call, mean of {args.reps} calls, fastest of {args.rounds} interleaved rounds; "
        f"{datetime.now():%Y-%m-%d %H:%M}. GFLOP/s: the direct convolution's arithmetic over the time. picked: "
        f"what `--cpu-tuning auto` measured and chose on this machine (siamkit/kernel_choice.py, no cache).\n"
    )
    print("| input | convolution | output map | count | " + " | ".join(LABEL[k] for k in KERNELS) + " | picked |")
    print("|---|---|---|---:|" + "---:|" * len(KERNELS) + "---|")
    tuning = []
    for size in args.sizes:
        shapes = resnet18_shapes(size)
        start = time.perf_counter()
        chosen = kernel_choice.choose(list(shapes), cache=None)
        tuning.append(f"{size}x{size}: {time.perf_counter() - start:.1f} s, {chosen.summary().removeprefix('--cpu-tuning auto: ')}")
        totals = {"pytorch": 0.0, "picked": 0.0, "best": 0.0}
        for shape, count in shapes.items():
            calls = candidate_calls(shape)
            for call in calls.values():
                call()  # warm-up: oneDNN builds its kernel for the shape
            rounds = []
            for r in range(args.rounds):  # interleaved, every other round reversed: a slow moment hits all alike
                order = list(calls) if r % 2 == 0 else list(reversed(calls))
                rounds.append({name: seconds_per_call(calls[name], args.reps) for name in order})
            best = {name: min(rd[name] for rd in rounds) for name in calls}
            oh, ow = shape.output
            flops = 3 * 2 * BATCH * oh * ow * shape.out_channels * shape.in_channels * shape.kernel[0] * shape.kernel[1]
            picked = chosen.kernels[shape]
            totals["pytorch"] += count * best[PYTORCH]
            totals["picked"] += count * best[picked]
            totals["best"] += count * min(best.values())
            cells = [
                f"{1e3 * best[k]:.1f} ms ({flops / best[k] / 1e9:.0f})" if k in best else "-" for k in KERNELS
            ]
            k = "x".join(map(str, shape.kernel))
            print(
                f"| {size}x{size} | {shape.in_channels}->{shape.out_channels} {k}/{shape.stride[0]} | {oh}x{ow} | {count} | "
                + " | ".join(cells) + f" | {LABEL[picked]} |"
            )
        print(
            f"| {size}x{size} | **all convolutions of one step** | | | {1e3 * totals['pytorch']:.0f} ms | | | | "
            f"picked: {1e3 * totals['picked']:.0f} ms ({totals['pytorch'] / totals['picked']:.2f}x); fastest of this "
            f"table: {1e3 * totals['best']:.0f} ms ({totals['pytorch'] / totals['best']:.2f}x) |"
        )
    print("\nThe tuning itself (kernel_choice.choose, as at the start of training): " + "; ".join(tuning) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
