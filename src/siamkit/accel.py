"""CPU tuning behind one switch (`--cpu-tuning auto|off`): what siamkit changes for speed on CPU.

`auto` (the default) does two things when training on CPU; `off` does neither and leaves PyTorch's
own kernels and the C library's malloc as they are (the setting for runs that must match across machines).

1. Keep freed memory in the process (`keep_freed_memory`). glibc serves blocks above its mmap
   threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, so every step would fault
   its large activations in again; with mmap off and trimming made rare the next step reuses them,
   as PyTorch's caching allocator does on GPU. Process-wide and not undone, so only training sets it.
2. Weight gradients of wide convolutions on small maps as a forward convolution (`SmallMapConv2d`).
   On AVX2 CPUs oneDNN's weight-gradient kernel for these layers runs at half its forward speed or
   less; the weight gradient is itself a convolution (input with batch and channels swapped, the
   output gradient as a dilated kernel), which the forward kernel runs fast. Same gradient up to
   float rounding (tests/test_accel.py).

Why these thresholds, and what each is worth, is measured in benchmarks/conv_weight_grad.py and
benchmarks/cpu_allocator.py (results in benchmarks/results/ and the README's Performance section).
"""
from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

CPU_TUNINGS = ("auto", "off")

# Where the swapped convolution measured faster than oneDNN's weight gradient on an AVX2 CPU
# (benchmarks/conv_weight_grad.py): output maps of at most 7x7, at least 256 input channels, kernels
# larger than 1x1 (a 1x1 weight gradient is a plain matrix product, which oneDNN already does well).
SMALL_MAP_AREA = 49
MIN_IN_CHANNELS = 256


def uses_swapped_weight_grad(in_channels: int, kernel_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether a convolution of this shape gets the swapped weight gradient (on CPU, when training)."""
    return (
        in_channels >= MIN_IN_CHANNELS
        and kernel_size[0] * kernel_size[1] > 1
        and out_size[0] * out_size[1] <= SMALL_MAP_AREA
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


@lru_cache(maxsize=None)
def cpu_is_avx2() -> bool:
    """The CPU kind the swap was measured on (ATen's kernels say AVX2: no AVX-512, where oneDNN's own is fast)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def conv2d_swapped_weight_grad(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """F.conv2d (groups 1, dilation 1) whose backward takes the weight gradient as a forward convolution."""
    return _WeightGradByForwardConv.apply(x, weight, bias, stride, padding)


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that takes the faster weight gradient where it helps."""

    def _fast_path(self, x: torch.Tensor) -> bool:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu" and x.dim() == 4):
            return False
        if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") or not cpu_is_avx2():
            return False
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_size = ((x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1)
        return uses_swapped_weight_grad(self.in_channels, self.kernel_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path(x):
            return conv2d_swapped_weight_grad(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def _eligible(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.in_channels >= MIN_IN_CHANNELS
        and m.kernel_size[0] * m.kernel_size[1] > 1
    )


def use_small_map_conv_backward(model: nn.Module) -> int:
    """Give the model's wide plain Conv2d layers the faster weight gradient; returns how many were changed.

    Which calls take it depends on the map size, known only at run time (see SmallMapConv2d). The
    modules keep their parameters (the same tensors), so optimizers, checkpoints and state_dicts are
    unaffected; only the class changes (SmallMapConv2d is an nn.Conv2d).
    """
    changed = 0
    for m in model.modules():
        if _eligible(m):
            m.__class__ = SmallMapConv2d
            changed += 1
    return changed


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


def tune_model(model: nn.Module, tuning: str) -> None:
    """Apply the model-level CPU tuning (the layers decide per call, so a CUDA model is unaffected)."""
    if tuning == "auto":
        use_small_map_conv_backward(model)


def tune_process(device: torch.device, tuning: str) -> None:
    """Apply the process-level tuning for training on ``device`` (only on CPU; process-wide, not undone)."""
    if device.type == "cpu" and tuning == "auto":
        keep_freed_memory()
