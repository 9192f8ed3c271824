"""Convolution weight gradients on CPU: oneDNN's own kernel against siamkit's swapped forward convolution.

For every distinct convolution of ResNet18 at the given input sizes, batch 96 (32 triplets), channels-
last as siamkit trains: the forward pass, the weight gradient as PyTorch computes it
(aten.convolution_backward, oneDNN on CPU), and the weight gradient as a forward convolution
(siamkit.accel.weight_grad_by_forward_conv), in ms and GFLOP/s, fastest of interleaved
rounds. "used" is what `--cpu-tuning auto` picks on this machine (pytorch, swapped, or a Winograd scheme,
which computes the whole convolution: benchmarks/conv_kernels.py times those): siamkit.kernel_choice.choose run
afresh (no cache) on the same shapes, its own measurement, as a training run without a cache does it.
The totals are per training step (each layer times
its count); the tuning's own time is given per size.

    PYTHONPATH=src python benchmarks/conv_weight_grad.py                 # 64x64 and 112x112
    PYTHONPATH=src python benchmarks/conv_weight_grad.py --sizes 112 --rounds 5
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import describe_device  # noqa: E402
from siamkit import kernel_choice  # noqa: E402
from siamkit.accel import ConvShape, weight_grad_by_forward_conv  # noqa: E402

BATCH = 96


def resnet18_convolutions(size: int) -> list[tuple[nn.Conv2d, tuple[int, ...], tuple[int, ...], int]]:
    """(layer, input shape, output shape, how many layers share them) for each distinct convolution."""
    seen: dict[tuple, list] = {}

    def record(mod, inp, out):
        key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, tuple(inp[0].shape[1:]))
        if key in seen:
            seen[key][3] += 1
        else:
            seen[key] = [mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:]), 1]

    model = resnet18()
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return [tuple(v) for v in seen.values()]


def seconds_per_call(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="calls per round")
    args = ap.parse_args(argv)

    cl = torch.channels_last
    print(f"### Convolution weight gradients ({describe_device('cpu')})\n")
    print(
        f"torch {torch.__version__}; ResNet18, batch {BATCH}, channels-last, fp32; fastest of {args.rounds} rounds "
        f"of {args.reps} calls; {datetime.now():%Y-%m-%d %H:%M}. used: the kernel `--cpu-tuning auto` measured "
        f"and picked on this machine (siamkit/kernel_choice.py, no cache).\n"
    )
    print("| input | convolution | output map | count | forward | weight grad: PyTorch (oneDNN) | weight grad: swapped conv | used |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    tuning = []
    for size in args.sizes:
        totals = {"native": 0.0, "siamkit": 0.0}
        convolutions = resnet18_convolutions(size)
        shapes = [ConvShape(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                            (BATCH, *i[1:]), True, "float32") for c, i, _, _ in convolutions]
        chosen = kernel_choice.choose(shapes, cache=None)
        tuning.append(f"{size}x{size}: {chosen.summary().removeprefix('--cpu-tuning auto: ')}")
        for (conv, in_shape, out_shape, count), shape in zip(convolutions, shapes):
            torch.manual_seed(0)
            x = torch.randn(BATCH, *in_shape).contiguous(memory_format=cl)
            w = conv.weight.detach().contiguous(memory_format=cl)
            g = torch.randn(BATCH, *out_shape).contiguous(memory_format=cl)
            s, p = conv.stride, conv.padding
            flops = 2 * BATCH * out_shape[0] * out_shape[1] * out_shape[2] * conv.in_channels * w.shape[2] * w.shape[3]
            native = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
                g, x, w, None, s, p, (1, 1), False, (0, 0), 1, (False, True, False)
            )
            swapped = lambda: weight_grad_by_forward_conv(x, g, w, s, p)  # noqa: E731
            forward = lambda: torch.nn.functional.conv2d(x, w, None, s, p)  # noqa: E731
            fns = (forward, native, swapped)
            for fn in fns:
                fn()  # warm-up: oneDNN builds its kernel for the shape
            # Fastest of interleaved rounds, so a slow moment of the machine hits all three alike.
            rounds = [[seconds_per_call(fn, args.reps) for fn in fns] for _ in range(args.rounds)]
            t_fwd, t_nat, t_swp = (min(column) for column in zip(*rounds))
            picked = chosen.kernels[shape]  # since issue 19 also a Winograd scheme (benchmarks/conv_kernels.py)
            used = picked == kernel_choice.SWAPPED
            totals["native"] += count * t_nat
            totals["siamkit"] += count * (t_swp if used else t_nat)
            k = "x".join(map(str, conv.kernel_size))
            print(
                f"| {size}x{size} | {conv.in_channels}->{conv.out_channels} {k}/{s[0]} | {out_shape[1]}x{out_shape[2]} "
                f"| {count} | {1e3 * t_fwd:.1f} ms ({flops / t_fwd / 1e9:.0f} GFLOP/s) "
                f"| {1e3 * t_nat:.1f} ms ({flops / t_nat / 1e9:.0f} GFLOP/s) "
                f"| {1e3 * t_swp:.1f} ms ({flops / t_swp / 1e9:.0f} GFLOP/s) | {picked} |"
            )
        print(
            f"| {size}x{size} | **all weight gradients of one step** | | | | {1e3 * totals['native']:.0f} ms "
            f"| siamkit: {1e3 * totals['siamkit']:.0f} ms ({totals['native'] / totals['siamkit']:.2f}x) | |"
        )
    print("\nThe tuning itself (kernel_choice.choose, as at the start of training): " + "; ".join(tuning) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
