"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(m x m, 3x3), forward and backward.

Each m x m block of outputs is computed from the (m + 2) x (m + 2) block of inputs around it: both are taken
to a "transformed" domain (fixed matrices B and G), where the convolution becomes (m + 2)^2 independent
matrix products over the channels (one ``torch.bmm``), and the result is taken back (matrix A). F(4x4, 3x3)
does 36 multiplications per 16 outputs where the direct convolution does 144 (4x fewer); F(2x2, 3x3) 16 per
4 outputs (2.25x fewer), with a smaller block that wastes less on small maps (a 2x2 map is one block). The
products run at the BLAS rate; the transforms are memory-bound. Whether that beats oneDNN's direct kernels
depends on the CPU and the shape (wide layers on small maps gain, narrow layers on large maps lose to the
transforms), so each scheme is a candidate of measure-and-pick (kernel_choice.py), taken only for the
shapes where it measured faster. The matrices are those of Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks" (CVPR 2016).

The backward runs in the same domain: the output gradient is transformed by A, the two gradients are two
more matrix products (the weight gradient needs the transformed input, kept from the forward), and the
input gradient is taken back by B and added up where neighbouring blocks overlap.

The result equals the direct convolution's up to float rounding, which is larger than the direct kernel's
(F(4x4, 3x3)'s transforms multiply and add values of up to 8 times the inputs' size): about 1e-6 relative
in float32, bounded in tests/test_winograd.py. ``--cpu-tuning off`` never uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Scheme:
    """F(m x m, 3x3): V = B^T d B on (m + 2)^2 input blocks, U = G g G^T, y = A^T (U * V) A on m x m outputs."""

    name: str
    tile: int  # m: outputs per block side
    b_t: torch.Tensor  # (m + 2, m + 2)
    g: torch.Tensor  # (m + 2, 3)
    a_t: torch.Tensor  # (m, m + 2)

    @property
    def span(self) -> int:
        """Inputs per block side: m + 3 - 1."""
        return self.tile + 2


F2 = Scheme(
    "winograd2", 2,
    _t([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    _t([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
    _t([[1, 1, 1, 0], [0, 1, -1, -1]]),
)
F4 = Scheme(
    "winograd4", 4,
    _t([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
    _t([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
    _t([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
)
SCHEMES = {s.name: s for s in (F2, F4)}


def applies(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether a convolution (groups 1, dilation 1) is one this module computes: 3x3, stride 1, padding 1."""
    return tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)


def _both_axes(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``rows @ block @ rows^T`` for every block of m (k * k, X), block row and column first: (r * r, X).

    One product by the Kronecker product of ``rows`` with itself (both axes at once): one pass over the
    memory where a product per axis would make two.
    """
    return torch.kron(rows, rows) @ m


def _transformed_input(x: torch.Tensor, scheme: Scheme, th: int, tw: int) -> torch.Tensor:
    """V = B^T d B for every input block d: (s^2, N * th * tw, C)."""
    n, c, h, w = x.shape
    t, s = scheme.tile, scheme.span
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, t * tw + 1 - w, 1, t * th + 1 - h))  # NHWC, zero border
    d = padded.unfold(1, s, t).unfold(2, s, t)  # (N, th, tw, C, s, s): the overlapping input blocks, a view
    d = d.permute(4, 5, 0, 1, 2, 3).reshape(s * s, n * th * tw * c)
    return _both_axes(scheme.b_t.to(x.dtype), d).view(s * s, n * th * tw, c)


def _transformed_weight(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """U = G g G^T for every (output, input) channel pair, as an (s^2, C_out, C) view of (C_out, s^2, C) memory.

    The weight's rows (C_out, 3 x 3, C) are its channels-last memory as it is (no copy), one product per
    output channel; bmm takes U in that layout, and transposed, at no cost.
    """
    co, c = weight.shape[:2]
    g = scheme.g.to(weight.dtype)
    return torch.matmul(torch.kron(g, g), weight.permute(0, 2, 3, 1).reshape(co, 9, c)).transpose(0, 1)


def _weight_grad(grad_u_t: torch.Tensor, weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The adjoint of _transformed_weight: (s^2, C_out, C) -> the weight's gradient, in the weight's memory format."""
    co, c = weight.shape[:2]
    g = scheme.g.to(weight.dtype)
    grad = torch.matmul(torch.kron(g, g).t(), grad_u_t.transpose(0, 1)).view(co, 3, 3, c).permute(0, 3, 1, 2)
    if grad.stride() == weight.stride():  # channels-last weights, as siamkit trains: already in place
        return grad
    return torch.empty_like(weight).copy_(grad)  # the weight's own memory format, as the optimizer expects


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
        n, c, h, w = x.shape
        co, t, s = weight.shape[0], scheme.tile, scheme.span
        th, tw = -(-h // t), -(-w // t)  # blocks per column and row; the last ones padded with zeros
        blocks = n * th * tw
        a_t = scheme.a_t.to(x.dtype)
        v = _transformed_input(x, scheme, th, tw)
        u_t = _transformed_weight(weight, scheme)
        m = torch.bmm(v, u_t.transpose(1, 2))  # (s^2, blocks, C_out): the convolution, one product per position
        y = _both_axes(a_t, m.view(s * s, blocks * co)).view(t, t, n, th, tw, co)
        # NHWC (a copy; reshape could return a strided view where th or tw is 1), cropped to the map
        y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, t * th, t * tw, co)[:, :h, :w].contiguous()
        if bias is not None:
            y = y + bias
        # The transformed input and weight are kept for the backward (the gradients are products with them):
        # memory beyond the direct convolution's, (s / t)^2 times the input and s^2 / 9 times the weight.
        ctx.save_for_backward(v, u_t, weight)
        ctx.dims, ctx.scheme, ctx.has_bias = (n, c, h, w, th, tw), scheme, bias is not None
        return y.permute(0, 3, 1, 2)  # channels-last memory, NCHW shape

    @staticmethod
    @once_differentiable  # no gradient of the gradient (training needs none): torch says so if asked for one
    def backward(ctx, grad_out: torch.Tensor):
        v, u_t, weight = ctx.saved_tensors
        (n, c, h, w, th, tw), scheme = ctx.dims, ctx.scheme
        co, blocks, t, s = u_t.shape[1], v.shape[1], scheme.tile, scheme.span
        b_t, a_t = (m.to(grad_out.dtype) for m in (scheme.b_t, scheme.a_t))
        dy = grad_out.permute(0, 2, 3, 1)
        if t * th != h or t * tw != w:
            dy = F.pad(dy, (0, 0, 0, t * tw - w, 0, t * th - h))
        dy = dy.reshape(n, th, t, tw, t, co).permute(2, 4, 0, 1, 3, 5).reshape(t * t, blocks * co)
        grad_m = _both_axes(a_t.t(), dy).view(s * s, blocks, co)  # the adjoint of y = A^T m A
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(torch.bmm(grad_m.transpose(1, 2), v), weight, scheme)  # via (s^2, C_out, C)
        if ctx.needs_input_grad[0]:
            grad_v = torch.bmm(grad_m, u_t)  # (s^2, blocks, C)
            grad_d = _both_axes(b_t.t(), grad_v.view(s * s, blocks * c)).view(s, s, n, th, tw, c)
            grad_x = _overlap_add(grad_d, t)[:, 1:h + 1, 1:w + 1].contiguous().permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _overlap_add(grad_d: torch.Tensor, t: int) -> torch.Tensor:
    """Sum the input blocks' gradients (s, s, N, th, tw, C) onto the padded input: (N, t (th + 1), t (tw + 1), C).

    Block (r, q) covers rows t r .. t r + t + 1 and the same columns: its first t rows fall in row block r,
    its last two in the first two rows of block r + 1 (the same for columns), hence four strided additions.
    """
    _, _, n, th, tw, c = grad_d.shape
    out = grad_d.new_empty(n, th + 1, t, tw + 1, t, c)
    by_block = grad_d.permute(2, 3, 0, 4, 1, 5)  # (N, th, s rows, tw, s columns, C)
    out[:, :th, :, :tw].copy_(by_block[:, :, :t, :, :t])  # each position once: no zeros needed there
    out[:, th].zero_()  # the last row block and column block get only the overlaps added
    out[:, :th, :, tw].zero_()
    out[:, 1:, :2, :tw].add_(by_block[:, :, t:, :, :t])
    out[:, :th, :, 1:, :2].add_(by_block[:, :, :t, :, t:])
    out[:, 1:, :2, 1:, :2].add_(by_block[:, :, t:, :, t:])
    return out.view(n, t * (th + 1), t * (tw + 1), c)


def conv3x3_winograd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scheme: Scheme = F4
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for a 3x3 ``weight``, by Winograd's ``scheme``.

    ``x``: (N, C, H, W), any memory format; the output is in channels-last memory (the layout the layers
    around it run in by siamkit's default). Gradients for x, weight and bias as the direct convolution's.
    """
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv3x3_winograd takes an (N, C, H, W) input and a (C_out, C, 3, 3) kernel, not {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return _Winograd.apply(x, weight, bias, scheme)
