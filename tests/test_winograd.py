"""Winograd convolutions (siamkit/winograd.py): the same output and gradients as conv2d, up to a derived bound.

Float64 checks the algebra (rounding there is ~1e-16 relative, so any error in a transform or an index shows
as a difference of order one). Float32 checks that the rounding stays within the first-order bound of the
computation's own sums (see ``_abs_path``). The layer (accel.TunedConv2d) takes it only where chosen.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from siamkit import accel, kernel_choice, winograd
from siamkit.accel import ConvShape, TunedConv2d, shape_of, use_kernels
from siamkit.winograd import F2, F4, SCHEMES, Scheme, conv3x3_winograd

# batch, in, out, height, width: square and not, sizes a multiple of the block and not, maps smaller than a block
SIZES = [(3, 5, 7, 8, 8), (2, 4, 3, 5, 7), (2, 4, 6, 2, 2), (1, 3, 2, 1, 3), (2, 6, 4, 13, 9)]


def _conv_and_grads(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor) -> list[torch.Tensor]:
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    return [y.detach(), *grads]


@pytest.mark.parametrize("scheme", [F2, F4], ids=lambda s: s.name)
@pytest.mark.parametrize("n, cin, cout, h, w", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_float64_matches_conv2d(scheme, n, cin, cout, h, w, bias):
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    g = torch.randn(n, cout, h, w, dtype=torch.float64)
    expected = _conv_and_grads(lambda x, w, b: nn.functional.conv2d(x, w, b, 1, 1), x, weight, b, g)
    got = _conv_and_grads(lambda x, w, b: conv3x3_winograd(x, w, b, scheme), x, weight, b, g)
    # float64 rounding (u = 1.1e-16) times the sums' terms (up to ~100 here, scaled by F(4x4, 3x3)'s
    # transforms by up to 8 x 8 x 5 x 5): ~1e-10 at most; a wrong index or coefficient is an O(1) error.
    for name, e, f in zip(["output", "input grad", "weight grad", "bias grad"], expected, got):
        torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-9, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last)  # the layout the next layers run in
    assert got[1].shape == x.shape and got[2].shape == weight.shape


def test_contiguous_inputs_and_weights_are_taken_too():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)  # NCHW memory
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = _conv_and_grads(lambda x, w, b: nn.functional.conv2d(x, w, b, 1, 1), x, weight, None, g)
    got = _conv_and_grads(lambda x, w, b: conv3x3_winograd(x, w, b), x, weight, None, g)
    for e, f in zip(expected, got):
        torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-9)
    got_w = _conv_and_grads(lambda x, w, b: conv3x3_winograd(x, w, b), x, weight.contiguous(memory_format=torch.channels_last), None, g)[2]
    assert got_w.is_contiguous(memory_format=torch.channels_last)  # the weight gradient keeps the weight's layout


def test_a_single_output_by_hand():
    """A 1x1 map: the output is the kernel's centre times the pixel (the rest of the 3x3 window is padding)."""
    for scheme in (F2, F4):
        x = torch.tensor([[[[3.0]]]], dtype=torch.float64, requires_grad=True)
        w = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3).requires_grad_()
        y = conv3x3_winograd(x, w, None, scheme)
        torch.testing.assert_close(y, torch.tensor([[[[12.0]]]], dtype=torch.float64))  # 3 * w[1, 1] = 3 * 4
        y.backward(torch.tensor([[[[2.0]]]], dtype=torch.float64))
        torch.testing.assert_close(x.grad, torch.tensor([[[[8.0]]]], dtype=torch.float64))  # 2 * 4
        expected_w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        expected_w[0, 0, 1, 1] = 6.0  # 2 * 3, on the centre tap only
        torch.testing.assert_close(w.grad, expected_w)


def _abs_path(scheme: Scheme, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """The sums of absolute values of every term the scheme adds, for the output and both gradients.

    The same computation with |x|, |w|, |g| and the absolute values of the matrices B, G, A: every sum in it
    adds the magnitudes of the terms the real computation adds. A sum of k terms computed in floating
    point is off by at most (k - 1) u times the sum of its terms' magnitudes (to first order; Higham,
    "Accuracy and Stability of Numerical Algorithms", 2002, section 4.2), and rounding the terms
    themselves adds one u each; chained sums add their k's.
    """
    abs_scheme = Scheme("abs", scheme.tile, scheme.b_t.abs(), scheme.g.abs(), scheme.a_t.abs())
    return _conv_and_grads(lambda x, w, b: conv3x3_winograd(x, w, b, abs_scheme), x.abs(), w.abs(), None, g.abs())


@pytest.mark.parametrize("scheme", [F2, F4], ids=lambda s: s.name)
def test_float32_rounding_is_within_the_derived_bound(scheme):
    torch.manual_seed(0)
    n, cin, cout, h, w = 4, 32, 24, 9, 11
    x64 = torch.randn(n, cin, h, w, dtype=torch.float64)
    w64 = torch.randn(cout, cin, 3, 3, dtype=torch.float64) / 10
    g64 = torch.randn(n, cout, h, w, dtype=torch.float64)
    exact = _conv_and_grads(lambda x, w, b: nn.functional.conv2d(x, w, b, 1, 1), x64, w64, None, g64)
    got = _conv_and_grads(lambda x, w, b: conv3x3_winograd(x, w, b, scheme), x64.float().contiguous(memory_format=torch.channels_last),
                          w64.float(), None, g64.float())
    magnitude = _abs_path(scheme, x64, w64, g64)
    # Terms per chain of sums: the input transform (s^2 terms), the weight transform (9), the product over
    # channels or blocks (at most max(cin, cout, blocks)), the output transform (s^2), the overlap of blocks (4),
    # and one rounding per input (the float32 copies of x, w and g, and of G's non-dyadic entries).
    blocks = n * math.ceil(h / scheme.tile) * math.ceil(w / scheme.tile)
    k = 2 * scheme.span ** 2 + 9 + max(cin, cout, blocks) + 4 + 4
    u = 2.0 ** -24  # float32's unit roundoff
    for name, e, f, m in zip(["output", "input grad", "weight grad"], exact, got, magnitude):
        err = (f.double() - e).abs()
        bound = k * u * m
        assert bool((err <= bound).all()), f"{name}: error {err.max():.3g} above the bound where it is {bound.flatten()[err.argmax()]:.3g}"
        assert err.max() > 0  # float32 did round: the comparison is not of the float64 path with itself


def test_only_3x3_kernels_are_taken():
    with pytest.raises(ValueError, match="3, 3"):
        conv3x3_winograd(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 5, 5))
    with pytest.raises(ValueError, match="3, 3"):
        conv3x3_winograd(torch.zeros(1, 2, 4, 4), torch.zeros(3, 4, 3, 3))  # channels do not match
    assert winograd.applies((3, 3), (1, 1), (1, 1))
    assert not winograd.applies((3, 3), (2, 2), (1, 1)) and not winograd.applies((3, 3), (1, 1), (0, 0))
    assert not winograd.applies((1, 1), (1, 1), (0, 0))


@pytest.fixture
def count_winograd_calls(monkeypatch):
    """How often the Winograd forward actually ran, and by which scheme."""
    calls = []
    original = winograd._Winograd.forward

    def counting(ctx, x, weight, bias, scheme):
        calls.append(scheme.name)
        return original(ctx, x, weight, bias, scheme)

    monkeypatch.setattr(winograd._Winograd, "forward", staticmethod(counting))
    return calls


def test_the_layer_takes_it_for_the_chosen_shape_only(count_winograd_calls):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    ref = copy.deepcopy(conv)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert use_kernels(conv, {shape_of(conv, x): "winograd4"}) == 1 and type(conv) is TunedConv2d
    conv(x[:1]).sum().backward()  # another batch size
    conv(x.contiguous()).sum().backward()  # another memory format
    with torch.no_grad():
        conv(x)  # evaluation
    assert count_winograd_calls == []
    conv.zero_grad()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    conv(xs[0]).sum().backward()
    ref(xs[1]).sum().backward()
    assert count_winograd_calls == ["winograd4"]
    # float64: the two differ by rounding only (see test_float64_matches_conv2d)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-9)


def test_a_kernel_that_cannot_compute_a_shape_is_not_given_to_it():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    strided = shape_of(conv, torch.zeros(2, 4, 8, 8).contiguous(memory_format=torch.channels_last))
    assert use_kernels(conv, {strided: "winograd4"}) == 0 and type(conv) is nn.Conv2d
    with pytest.raises(ValueError, match="unknown convolution kernel"):
        use_kernels(conv, {strided: "fft"})


def test_resnet18_step_matches_the_plain_network_with_winograd_wherever_it_applies(count_winograd_calls):
    """A whole ResNet18 at 32x32 (maps 8, 4, 2, 1), Winograd wherever it applies: same loss and gradients.

    float64, as the swap's test in test_accel.py: rounding there is ~1e-16 relative per sum, so 1e-9 leaves
    orders of magnitude for the sums through 20 layers and still catches any real error.
    """
    torch.manual_seed(0)
    ref = resnet18(num_classes=10).double().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(ref)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    shapes = kernel_choice.conv_shapes(fast, lambda: fast(x))
    # F(2x2, 3x3) for the maps of 2x2 or less, F(4x4, 3x3) for the others: both schemes run
    chosen = {s: ("winograd2" if s.input[1] <= 2 else "winograd4") for s in shapes if accel.kernel_applies("winograd4", s)}
    # ResNet18's 3x3 stride-1 layers on maps of 8, 4 and 2 (4 + 3 + 3); not the strided ones, the shortcuts, the
    # stem, nor layer4's on 1x1 maps (a 1x1 map is plain contiguous memory, not channels-last: is_channels_last)
    assert use_kernels(fast, chosen) == 10
    losses = []
    for m in (ref, fast):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    assert sorted(set(count_winograd_calls)) == ["winograd2", "winograd4"] and len(count_winograd_calls) == 10
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_the_schemes_are_named_as_the_kernels_that_pick_them():
    assert set(SCHEMES) == {"winograd2", "winograd4"} and {F2.span, F4.span} == {4, 6}
    assert set(SCHEMES) <= set(accel.KERNEL_NAMES)
    assert accel.kernel_applies("winograd2", ConvShape(8, 8, (3, 3), (1, 1), (1, 1), (2, 4, 4), True, "float32"))
