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

from siamkit import accel
from siamkit.accel import (
    MIN_IN_CHANNELS,
    SMALL_MAP_AREA,
    SmallMapConv2d,
    conv2d_swapped_weight_grad,
    use_small_map_conv_backward,
    uses_swapped_weight_grad,
)
from siamkit.config import TrainConfig
from siamkit.errors import SiamkitError
from siamkit.train.loop import train
from siamkit.train.run import build_model
from tiny_run import one_torch_thread, tiny_config  # noqa: F401


def _grads(conv_fn, params: list[torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = conv_fn(x, *params)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in params]


@pytest.fixture(autouse=True)
def avx2_cpu(monkeypatch):
    """The swap is taken on AVX2 CPUs only (where it was measured); test its path on any machine."""
    monkeypatch.setattr(accel, "cpu_is_avx2", lambda: True)


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


def test_which_shapes_take_it():
    c = MIN_IN_CHANNELS
    assert uses_swapped_weight_grad(c, (3, 3), (7, 7))  # 49 positions
    assert not uses_swapped_weight_grad(c, (3, 3), (7, 8))
    assert not uses_swapped_weight_grad(c - 1, (3, 3), (4, 4))
    assert not uses_swapped_weight_grad(c, (1, 1), (4, 4))
    assert uses_swapped_weight_grad(2 * c, (3, 1), (2, 2))


def _wide_conv() -> nn.Conv2d:
    conv = nn.Conv2d(MIN_IN_CHANNELS, 8, 3, padding=1)
    assert use_small_map_conv_backward(conv) == 1 and type(conv) is SmallMapConv2d
    return conv


def test_the_module_takes_it_on_small_maps_only(count_fast_calls):
    conv = _wide_conv()
    side = int(SMALL_MAP_AREA**0.5) + 1  # one row and column more than the largest small map
    conv(torch.randn(2, MIN_IN_CHANNELS, side, side)).sum().backward()
    assert count_fast_calls == []
    x = torch.randn(2, MIN_IN_CHANNELS, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    assert len(count_fast_calls) == 1
    ref = nn.Conv2d(MIN_IN_CHANNELS, 8, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    conv.zero_grad()
    conv(x.detach()).sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad)


def test_no_grad_frozen_weights_autocast_and_other_cpus_take_the_plain_path(count_fast_calls, monkeypatch):
    conv = _wide_conv()
    x = torch.randn(2, MIN_IN_CHANNELS, 4, 4)
    with monkeypatch.context() as m:
        m.setattr(accel, "cpu_is_avx2", lambda: False)
        conv(x.clone().requires_grad_(True)).sum().backward()
    with torch.no_grad():
        conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    assert conv.weight.grad is not None
    conv.requires_grad_(False)
    conv(x.clone().requires_grad_(True)).sum().backward()
    assert count_fast_calls == []


def test_only_wide_plain_convolutions_are_swapped():
    c = MIN_IN_CHANNELS
    model = nn.Sequential(
        nn.Conv2d(c, 4, 3),  # swapped
        nn.Conv2d(c, 4, 3, groups=2),  # grouped: the swap computes groups=1 only
        nn.Conv2d(c, 4, 3, dilation=2),
        nn.Conv2d(c, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(c, 4, 3, padding="same"),
        nn.Conv2d(c, 4, 1),
        nn.Conv2d(c - 1, 4, 3),
    )
    assert use_small_map_conv_backward(model) == 1
    assert [type(m) for m in model] == [SmallMapConv2d] + [nn.Conv2d] * 6


def test_resnet18_step_matches_the_plain_network(count_fast_calls):
    """A whole ResNet18 at 64x64 (layer3 on 4x4 maps, layer4 on 2x2): same loss and every gradient."""
    torch.manual_seed(0)
    ref = resnet18(num_classes=10)
    fast = copy.deepcopy(ref)
    # layer3: the three 256->256 3x3 convolutions; layer4: 256->512 and the three 512->512.
    assert use_small_map_conv_backward(fast) == 7
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(8, 3, 64, 64)
    y = torch.randint(0, 10, (8,))
    losses = []
    for m in (ref, fast):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    assert len(count_fast_calls) == 7
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_models_use_it_unless_tuning_is_off():
    def swapped(cfg):
        return sum(type(m) is SmallMapConv2d for m in build_model(cfg, 4, 3).modules())

    assert swapped(TrainConfig()) == 7
    assert swapped(TrainConfig(cpu_tuning="off")) == 0


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
