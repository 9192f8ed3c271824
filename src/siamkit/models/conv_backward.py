"""A faster weight gradient for convolutions on small feature maps, on AVX2 CPUs.

On this project's AVX2 CPU (AMD EPYC) oneDNN computes a convolution's weight gradient with its older
`jit:avx2` kernel (ONEDNN_VERBOSE=1 shows it), which runs at half the speed of the same layer's
brgemm forward pass or less; in a ResNet18 training step at 112x112 the weight gradients take about
half of the step. The weight gradient is itself a convolution -- of the input (batch and channels
swapped) with the output gradient as the kernel -- and oneDNN's forward kernel runs that one near
matmul speed when the feature map is small and the layer wide. `benchmarks/conv_weight_grad.py`
measures both for every layer of ResNet18: the swapped convolution wins on 3x3 layers with at least
256 input channels on maps of at most 7x7 (512->512 on 4x4: 62 -> 141 GFLOP/s; on 2x2: 31 -> 104)
and loses elsewhere (1x1 layers, 128-channel layers, large maps), so only those layers take it: the
weight gradients of a 112x112 step drop by a quarter, of a 64x64 step by over a third.

The result is the same gradient up to float rounding (tests/models/test_conv_backward.py checks it
against autograd's). Everything else keeps nn.Conv2d's own path: CPUs other than AVX2 ones (not
measured: AVX-512 CPUs have oneDNN's brgemm weight gradients), CUDA (cuDNN), torch.compile (inductor
picks its own kernels), autocast, frozen weights, inference. `--native-conv-backward` turns it off.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# Where the swapped convolution was faster than oneDNN's weight gradient (benchmarks/conv_weight_grad.py):
# output maps of at most 7x7 (ResNet18's layer3/layer4 at 112x112 and 64x64; at 14x14 the swap was 10%
# slower, at 28x28 3x slower), at least 256 input channels (128->256 lost at 7x7 and 4x4), kernels
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


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@lru_cache(maxsize=None)
def cpu_is_avx2() -> bool:
    """The CPU kind the swap was measured on (ATen's kernels say AVX2: no AVX-512)."""
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
        if torch.compiler.is_compiling() or _autocast_on("cpu") or not cpu_is_avx2():
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
