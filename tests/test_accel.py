"""CPU tuning (siamkit/accel.py, --cpu-tuning auto|off).

The swapped-convolution weight gradient: the same outputs and gradients as conv2d, taken only where meant.
The kept malloc memory: freed memory comes back without page faults; training sets it on CPU only, with auto.
The fault counts run in fresh Python processes: mallopt changes a whole process, and a process that already
reused memory (this one, after other tests) would not show the difference.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from siamkit import accel, kernel_choice
from siamkit.accel import (
    SWAPPED,
    ConvShape,
    TunedConv2d,
    conv2d_swapped_weight_grad,
    shape_of,
    swappable,
    use_swapped_weight_grad,
)
from siamkit.config import TrainConfig
from siamkit.errors import SiamkitError
from siamkit.train.loop import train
from siamkit.train.run import build_training
from siamkit.train.step import optimisation_step
from tiny_run import one_torch_thread, tiny_config  # noqa: F401


def _grads(conv_fn, params: list[torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = conv_fn(x, *params)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in params]


@pytest.fixture
def count_fast_calls(monkeypatch):
    """How often the swapped-convolution backward actually ran."""
    calls = []
    original = accel._WeightGradByForwardConv.backward

    def counting(ctx, grad_out):
        calls.append(grad_out.shape)
        return original(ctx, grad_out)

    monkeypatch.setattr(accel._WeightGradByForwardConv, "backward", staticmethod(counting))
    return calls


# in, out, kernel, stride, padding, bias, input size (H, W), channels-last
CASES = [
    (8, 16, 3, 1, 1, False, (4, 4), True),  # ResNet layer4 at 112x112, scaled down
    (8, 16, 3, 2, 1, False, (7, 7), True),  # strided, odd size (the last row/column is not used)
    (8, 16, 1, 2, 0, False, (7, 7), True),  # 1x1 shortcut
    (5, 6, 3, 1, 0, True, (6, 5), False),  # bias, no padding, rectangular, NCHW
    (4, 6, (3, 1), (2, 1), (1, 0), True, (5, 7), True),  # rectangular kernel, stride and padding
]


@pytest.mark.parametrize("cin, cout, k, s, p, bias, hw, cl", CASES)
def test_same_output_and_gradients_as_conv2d(cin, cout, k, s, p, bias, hw, cl, count_fast_calls):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, s, p, bias=bias).double()
    fmt = torch.channels_last if cl else torch.contiguous_format
    params = [ref.weight.contiguous(memory_format=fmt)] + ([ref.bias] if bias else [])
    x = torch.randn(3, cin, *hw, dtype=torch.float64).contiguous(memory_format=fmt)
    g = torch.randn_like(ref(x))

    def plain(x, w, b=None):
        return nn.functional.conv2d(x, w, b, ref.stride, ref.padding)

    def swapped(x, w, b=None):
        return conv2d_swapped_weight_grad(x, w, b, ref.stride, ref.padding)

    expected, got = _grads(plain, params, x, g), _grads(swapped, params, x, g)
    assert len(count_fast_calls) == 1  # the swapped backward ran (float64: exact up to summation order)
    for name, e, f in zip(["output", "input grad", "weight grad", "bias grad"], expected, got):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10, msg=name)
    assert got[2].stride() == params[0].stride()  # the optimizer sees the weight's own layout


def test_weight_gradient_by_hand():
    """A 1-channel 2x2 input, 2x2 kernel, no padding: dW[i, j] = g * x[i, j] for the single output."""
    w = torch.tensor([[[[1.0, -1.0], [0.5, 2.0]]]], requires_grad=True)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    out = conv2d_swapped_weight_grad(x, w, None, (1, 1), (0, 0))
    assert out.item() == 1.0 - 2.0 + 1.5 + 8.0
    out.backward(torch.tensor([[[[10.0]]]]))
    torch.testing.assert_close(w.grad, torch.tensor([[[[10.0, 20.0], [30.0, 40.0]]]]))
    torch.testing.assert_close(x.grad, 10.0 * w.detach())


def test_shape_of_a_call_and_its_key():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    x = torch.zeros(5, 8, 7, 6).contiguous(memory_format=torch.channels_last)
    shape = shape_of(conv, x)
    assert shape == ConvShape(8, 16, (3, 3), (2, 2), (1, 1), (5, 7, 6), True, "float32")
    assert shape.output == (4, 3)  # (7 + 2 - 3) // 2 + 1, (6 + 2 - 3) // 2 + 1
    assert shape.key() == "8-16 k3x3 s2x2 p1x1 in5x7x6 channels_last float32"
    assert ConvShape.from_key(shape.key()) == shape
    assert not shape_of(conv, torch.zeros(5, 8, 7, 6)).channels_last
    with pytest.raises(ValueError, match="not a convolution shape key"):
        ConvShape.from_key("8-16 k3x3")


def _conv_taking_the_swap_at(hw: tuple[int, int]) -> tuple[nn.Conv2d, torch.Tensor]:
    """A conv whose weight gradient at a batch of 2 x hw is chosen to be the swapped one, and such a batch."""
    conv = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, *hw)
    assert use_swapped_weight_grad(conv, [shape_of(conv, x)]) == 1 and type(conv) is TunedConv2d
    return conv, x


def test_the_module_takes_it_for_the_chosen_shapes_only(count_fast_calls):
    conv, x = _conv_taking_the_swap_at((4, 4))
    conv(torch.randn(2, 6, 5, 5)).sum().backward()  # another map size
    conv(torch.randn(3, 6, 4, 4)).sum().backward()  # another batch size
    conv(x.contiguous(memory_format=torch.channels_last)).sum().backward()  # another memory format
    assert count_fast_calls == []
    x = x.clone().requires_grad_(True)
    conv.zero_grad()
    conv(x).sum().backward()
    assert len(count_fast_calls) == 1
    ref = nn.Conv2d(6, 8, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    # float32, the same sums in another order: a few ulps of the largest partial sum (|x| ~ 4, 2 x 16 terms)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad)


def test_no_grad_frozen_weights_and_autocast_take_the_plain_path(count_fast_calls):
    conv, x = _conv_taking_the_swap_at((4, 4))
    with torch.no_grad():
        conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    assert conv.weight.grad is not None
    conv.requires_grad_(False)
    conv(x.clone().requires_grad_(True)).sum().backward()
    assert count_fast_calls == []


def test_only_plain_convolutions_with_a_weight_gradient_can_swap():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3),  # swappable
        nn.Conv2d(4, 4, 1, stride=2),  # swappable: any kernel, any stride
        nn.Conv2d(4, 4, 3, groups=2),  # grouped: the swap computes groups=1 only
        nn.Conv2d(4, 4, 3, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 3).requires_grad_(False),  # frozen: no weight gradient to compute
    )
    assert [swappable(m) for m in model] == [True, True] + [False] * 5
    x = torch.zeros(2, 4, 8, 8)
    # The shapes the first two would see; layers are matched by their own parameters, not by position.
    shapes = [shape_of(model[0], x), shape_of(model[1], x), ConvShape(4, 4, (5, 5), (1, 1), (0, 0), (2, 8, 8), False, "float32")]
    assert use_swapped_weight_grad(model, shapes) == 2
    assert [type(m) for m in model] == [TunedConv2d, TunedConv2d] + [nn.Conv2d] * 5
    assert model[0].kernels == {shapes[0]: SWAPPED} and model[1].kernels == {shapes[1]: SWAPPED}
    assert use_swapped_weight_grad(model, []) == 0  # chosen again, without the swap: plain layers again
    assert all(type(m) is nn.Conv2d for m in model)


def test_resnet18_step_matches_the_plain_network_with_every_convolution_swapped(count_fast_calls):
    """A whole ResNet18 at 64x64, every convolution's weight gradient swapped: same loss and every gradient.

    In float64, where the two paths' different summation orders differ by ~1e-16 relative per sum: the
    1e-9 tolerance leaves six orders of magnitude for sums of up to 8 x 32 x 32 terms through 20 layers,
    and catches any real error. (In float32 the same comparison must allow ~1e-3 on conv1: no test at all.)
    """
    torch.manual_seed(0)
    ref = resnet18(num_classes=10).double()
    fast = copy.deepcopy(ref)
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    shapes = kernel_choice.conv_shapes(fast, lambda: fast(x))
    assert sum(shapes.values()) == 20  # ResNet18's 20 convolutions, in 11 distinct shapes
    assert use_swapped_weight_grad(fast, shapes) == 20
    assert fast.state_dict().keys() == ref.state_dict().keys()
    losses = []
    for m in (ref, fast):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    assert len(count_fast_calls) == 20
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)  # the forward passes are the same kernels
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def _training_with_swap_measured_faster(monkeypatch, tmp_path, tuning: str, **options):
    """build_training of a ResNet18 whose measurements (faked) say the swap is twice as fast everywhere."""
    measured = []

    def measure(shape):
        measured.append(shape)
        return {kernel_choice.PYTORCH: 2.0, kernel_choice.SWAPPED: 1.0}

    monkeypatch.setattr(kernel_choice, "measure_shape", measure)
    cfg = TrainConfig(image_size=[32, 32], batch_size=4, cpu_tuning=tuning, cache_dir=str(tmp_path), **options)
    training = build_training(cfg, 4, 3, torch.device("cpu"), total=1)
    return training, measured


def test_training_models_take_the_measured_choice_unless_tuning_is_off(monkeypatch, tmp_path):
    training, measured = _training_with_swap_measured_faster(monkeypatch, tmp_path / "a", "auto")
    tuned = [m for m in training.model.modules() if type(m) is TunedConv2d]
    # ResNet18's 20 convolutions in 11 distinct shapes, each measured once; every layer takes the swap.
    assert len(measured) == 11 and len(set(measured)) == 11 and len(tuned) == 20
    assert set(training.conv_kernels.values()) == {"swapped"} and len(training.conv_kernels) == 11
    assert all(s.input[0] == 3 * 4 for s in measured)  # the batch: 3 branches x 4 triplets, in one pass
    training, measured = _training_with_swap_measured_faster(monkeypatch, tmp_path / "b", "off")
    assert measured == [] and training.conv_kernels == {}
    assert not any(type(m) is TunedConv2d for m in training.model.modules())


@pytest.mark.parametrize("policy, passes, channels_last", [("joint", 1, True), ("sequential", 3, True), ("joint", 1, False)])
def test_the_measured_shapes_are_those_the_training_step_runs(
    monkeypatch, tmp_path, count_fast_calls, policy, passes, channels_last
):
    """Every convolution of a real step takes the swap chosen for it: one pass of 12 rows, or 3 of 4 (per branch)."""
    training, measured = _training_with_swap_measured_faster(
        monkeypatch, tmp_path, "auto", bn_policy=policy, channels_last=channels_last
    )
    assert {s.input[0] for s in measured} == {12 // passes}
    # (a 1x1 map is both layouts at once, and is_channels_last calls it contiguous, as in the step itself)
    assert {s.channels_last for s in measured if s.input[1:] != (1, 1)} == {channels_last}
    x = torch.randn(12, 3, 32, 32)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    optimisation_step(training, x, torch.tensor([0, 1, 2, 3] * 3))
    assert len(count_fast_calls) == 20 * passes  # ResNet18's 20 convolutions in each backbone pass


@pytest.mark.parametrize("options", [{"compile": True}, {"amp": "bf16"}])
def test_compile_and_autocast_measure_nothing(monkeypatch, tmp_path, options):
    """They run PyTorch's kernels in any case (TunedConv2d steps aside), so measuring would be wasted time."""
    training, measured = _training_with_swap_measured_faster(monkeypatch, tmp_path, "auto", **options)
    assert measured == [] and training.conv_kernels == {}


# --------------------------------------------------------------------------- kept malloc memory

SRC = Path(accel.__file__).resolve().parents[1]
BLOCK_BYTES = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB), like a large activation
CYCLES = 5
# glibc settles into reusing the freed block only after a few cycles (7 here: until then memalign's
# alignment slack keeps the freed block a little too small, and the heap grows instead).
WARMUP_CYCLES = 20
PAGE_BYTES = 4096

# Allocates, touches and frees a 64 MiB tensor WARMUP_CYCLES + CYCLES times; prints the minor faults of the last CYCLES.
FAULTS = f"""
import resource, sys, torch
from siamkit import accel
if sys.argv[1] == "cached":
    assert accel.keep_freed_memory()
def cycle():
    t = torch.empty({BLOCK_BYTES} // 4)
    t.fill_(1.0)
    del t
for _ in range({WARMUP_CYCLES}):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CYCLES}):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> int:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


def transparent_huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cached_setting_reuses_freed_memory_without_page_faults():
    pages = CYCLES * BLOCK_BYTES // PAGE_BYTES  # 81,920: what the kernel maps in again when each block is new
    system, cached = faults("system"), faults("cached")
    assert cached < pages // 100, (cached, system)
    if transparent_huge_pages_always():  # 2 MiB pages: 512 times fewer faults, still some
        assert system > cached
    else:
        assert system >= 0.9 * pages, (cached, system)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(accel.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(accel.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called without glibc"))
    assert accel.keep_freed_memory() is False


@pytest.mark.parametrize("setting, calls", [("auto", 1), ("off", 0)])
def test_train_on_cpu_sets_the_allocator_as_asked(setting, calls, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(accel, "keep_freed_memory", lambda: seen.append(True) or True)
    train(tiny_config(tmp_path / "run", steps=1, cpu_tuning=setting), progress=False)
    assert len(seen) == calls


def test_unknown_tuning_is_refused():
    with pytest.raises(SiamkitError, match="--cpu-tuning 'fast' is not known; choose one of: auto, off"):
        TrainConfig(cpu_tuning="fast").validate()
