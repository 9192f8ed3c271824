"""CPU tuning behind one switch (`--cpu-tuning auto|off`): what siamkit changes for speed on CPU.

`auto` (the default) does two things when training on CPU; `off` does neither and leaves PyTorch's
own kernels and the C library's malloc as they are (the setting for runs that must match across machines).

1. Keep freed memory in the process (`keep_freed_memory`). glibc serves blocks above its mmap
   threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, so every step would fault
   its large activations in again; with mmap off and trimming made rare the next step reuses them,
   as PyTorch's caching allocator does on GPU. Process-wide and not undone, so only training sets it.
2. For each convolution shape of the model, the fastest way to compute it in training (forward, input
   and weight gradients), measured on the machine at hand (kernel_choice.py, like cuDNN's benchmark
   mode), among:
   - PyTorch's own (oneDNN on CPU);
   - the same, but the weight gradient as a forward convolution (input with batch and channels swapped,
     the output gradient as a dilated kernel), which oneDNN's forward kernel runs faster on some CPUs and
     shapes (on an AVX2 EPYC, ResNet18's layer3 and layer4: the whole step 1.17-1.28x faster) and slower
     on others (an AVX-512 EPYC: every ResNet18 shape);
   - for 3x3 convolutions of stride 1, Winograd's F(2x2, 3x3) and F(4x4, 3x3) (winograd.py): fewer
     multiplications, in one large matrix product, plus memory-bound transforms; faster for wide layers
     on small maps (ResNet18's layer2-layer4 on an AVX-512 EPYC).
   Same results up to float rounding (tests/test_accel.py, tests/test_winograd.py).
   This module holds the swap and the layer that takes the chosen kernel for the input shapes chosen
   (`TunedConv2d`).

What each is worth is measured in benchmarks/conv_kernels.py, benchmarks/conv_weight_grad.py and benchmarks/cpu_allocator.py
(results in benchmarks/results/ and docs/guide/performance.md).
"""
from __future__ import annotations

import ctypes
import platform
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import winograd

CPU_TUNINGS = ("auto", "off")


@dataclass(frozen=True)
class ConvShape:
    """What the speed of a convolution's weight gradient depends on: the layer and the input it sees."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    input: tuple[int, int, int]  # batch, height, width
    channels_last: bool
    dtype: str  # "float32", as torch names it without its "torch." prefix

    @property
    def output(self) -> tuple[int, int]:
        (h, w), (kh, kw), (sh, sw), (ph, pw) = self.input[1:], self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def key(self) -> str:
        """One string for JSON files and checkpoints, e.g. ``256-512 k3x3 s2x2 p1x1 in96x8x8 channels_last float32``."""
        x = "x".join
        return (
            f"{self.in_channels}-{self.out_channels} k{x(map(str, self.kernel))} s{x(map(str, self.stride))} "
            f"p{x(map(str, self.padding))} in{x(map(str, self.input))} "
            f"{'channels_last' if self.channels_last else 'contiguous'} {self.dtype}"
        )

    @classmethod
    def from_key(cls, key: str) -> "ConvShape":
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"not a convolution shape key: {key!r}")
        pair = lambda s: tuple(int(v) for v in s.split("x"))  # noqa: E731
        return cls(
            int(m["cin"]), int(m["cout"]), pair(m["k"]), pair(m["s"]), pair(m["p"]), pair(m["input"]),
            m["format"] == "channels_last", m["dtype"],
        )


_KEY = re.compile(
    r"(?P<cin>\d+)-(?P<cout>\d+) k(?P<k>\d+x\d+) s(?P<s>\d+x\d+) p(?P<p>\d+x\d+) in(?P<input>\d+x\d+x\d+) "
    r"(?P<format>channels_last|contiguous) (?P<dtype>\w+)"
)


def is_channels_last(x: torch.Tensor) -> bool:
    """Channels-last and not plain contiguous (a tensor can be both, e.g. with one channel: then contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def shape_of(conv: nn.Conv2d, x: torch.Tensor) -> ConvShape:
    """The ConvShape of ``conv`` called on ``x`` (a 4-d batch)."""
    return ConvShape(
        conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding),
        tuple(x.shape[:1]) + tuple(x.shape[2:]), is_channels_last(x), str(x.dtype).removeprefix("torch."),
    )


def swappable(m: nn.Module) -> bool:
    """A plain Conv2d whose weight gradient the swap computes (groups 1, dilation 1, zero padding) and is needed."""
    return (
        type(m) in (nn.Conv2d, TunedConv2d)
        and m.groups == 1
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.weight.requires_grad
    )


def weight_grad_by_forward_conv(
    x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """The gradient of conv2d(x, weight, stride, padding) (groups 1, dilation 1) with respect to weight.

    dW[o, c, i, j] = sum over n, y, x of g[n, o, y, x] * x[n, c, s*y + i - p, s*x + j - p]: a convolution
    of the input with batch and channels swapped, by g as an (o, n, OH, OW) kernel dilated by the stride.
    The output can be larger than the kernel where the stride skipped the last rows or columns.
    """
    kh, kw = weight.shape[-2:]
    x_t = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    g_t = grad_out.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    swapped = F.conv2d(x_t, g_t, None, 1, padding, stride)  # (c, o, >= kh, >= kw)
    grad_w = torch.empty_like(weight)  # keeps the weight's memory format, as the optimizer expects
    grad_w.copy_(swapped[:, :, :kh, :kw].transpose(0, 1))
    return grad_w


class _WeightGradByForwardConv(torch.autograd.Function):
    """conv2d whose backward computes the weight gradient as a forward convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: tuple[int, int], padding: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), 1, (True, False, False)
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_by_forward_conv(x, grad_out, weight, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def conv2d_swapped_weight_grad(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """F.conv2d (groups 1, dilation 1) whose backward takes the weight gradient as a forward convolution."""
    return _WeightGradByForwardConv.apply(x, weight, bias, stride, padding)


# The ways to compute a convolution in training that measure-and-pick (kernel_choice.py) chooses between.
PYTORCH, SWAPPED = "pytorch", "swapped"  # PyTorch's own; its forward and input gradient with the swapped weight gradient
KERNEL_NAMES = (PYTORCH, SWAPPED, *winograd.SCHEMES)  # + "winograd2", "winograd4": the whole convolution by Winograd


def kernel_applies(kernel: str | None, shape: ConvShape) -> bool:
    """Whether ``kernel`` can compute a convolution of ``shape`` (PyTorch's own and the swap: every swappable one).

    Winograd: 3x3, stride 1, padding 1, in channels-last memory (its output is channels-last, and in an
    NCHW network the layout changes around it would cost more than measuring the convolution alone shows).
    """
    if kernel in winograd.SCHEMES:
        return shape.channels_last and winograd.applies(shape.kernel, shape.stride, shape.padding)
    return kernel in KERNEL_NAMES


class TunedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that computes the input shapes chosen by the kernel chosen.

    ``kernels``: {ConvShape: kernel name} for the shapes where another way than PyTorch's own measured
    faster; any other call (another batch shape, evaluation, autocast, torch.compile, CUDA) runs PyTorch's
    own convolution.
    """

    kernels: dict[ConvShape, str] = {}

    def _kernel(self, x: torch.Tensor) -> str:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu" and x.dim() == 4):
            return PYTORCH
        if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
            return PYTORCH
        return self.kernels.get(shape_of(self, x), PYTORCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(x)
        if kernel == SWAPPED:
            return conv2d_swapped_weight_grad(x, self.weight, self.bias, self.stride, self.padding)
        if kernel in winograd.SCHEMES:
            return winograd.conv3x3_winograd(x, self.weight, self.bias, winograd.SCHEMES[kernel])
        return super().forward(x)


def use_kernels(model: nn.Module, kernels: Mapping[ConvShape, str]) -> int:
    """Give each swappable Conv2d of ``model`` the kernels chosen for those of the shapes that are its own.

    ``kernels``: {ConvShape: kernel name}; PyTorch's own (``"pytorch"``) needs no entry. Returns how many
    layers take another kernel for some shape. Layers without one stay (or become again) plain nn.Conv2d.
    The modules keep their parameters (the same tensors), so optimizers, checkpoints and state_dicts are
    unaffected; only the class changes (TunedConv2d is an nn.Conv2d).
    """
    unknown = sorted({k for k in kernels.values() if k not in KERNEL_NAMES})
    if unknown:
        raise ValueError(f"unknown convolution kernel(s) {unknown}; known: {', '.join(KERNEL_NAMES)}")
    changed = 0
    for m in model.modules():
        if not swappable(m):
            continue
        mine = {
            s: k for s, k in kernels.items()
            if k != PYTORCH and kernel_applies(k, s)
            and (s.in_channels, s.out_channels, s.kernel, s.stride, s.padding)
            == (m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding))
        }
        m.__class__ = TunedConv2d if mine else nn.Conv2d
        if mine:
            m.kernels = mine
            changed += 1
        else:
            m.__dict__.pop("kernels", None)
    return changed


def use_swapped_weight_grad(model: nn.Module, shapes: Iterable[ConvShape]) -> int:
    """``use_kernels`` with the swapped weight gradient for every one of ``shapes``."""
    return use_kernels(model, {s: SWAPPED for s in shapes})


# mallopt(3) parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Return the heap's free top to the kernel only when it exceeds this (the largest int mallopt takes).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Turn off glibc malloc's mmap for large blocks and its trimming; False where the C library is not glibc.

    Large requests from threads other than the main one still fall back to mmap, so nothing fails for want of it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1  # 1 = success


def tune_process(device: torch.device, tuning: str) -> None:
    """Apply the process-level tuning for training on ``device`` (only on CPU; process-wide, not undone)."""
    if device.type == "cpu" and tuning == "auto":
        keep_freed_memory()
