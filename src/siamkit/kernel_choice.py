"""Measure-and-pick of convolution kernels on CPU (`--cpu-tuning auto`), like cuDNN's benchmark mode.

At the start of CPU training every distinct convolution shape of the model, at the shape of the training
batch (``conv_shapes``: one forward pass under hooks), gets the training work of that convolution (its
forward and the gradients of its input and weight) timed by each candidate that can compute it (accel.py):
PyTorch's own (oneDNN), PyTorch's with the swapped weight gradient, and, for 3x3 convolutions of stride 1
in channels-last memory, Winograd's F(2x2, 3x3) and F(4x4, 3x3) (winograd.py); a few interleaved calls
each, and the fastest is kept. Which one wins depends on the CPU (its ISA, its oneDNN kernels, its memory
bandwidth), the thread count and the shape, so nothing here is a threshold of one machine.

The choices are cached in ``<cache dir>/cpu-tuning.json`` (the decoded cache's folder: --cache-dir,
$SIAMKIT_CACHE_DIR, $XDG_CACHE_HOME/siamkit, ~/.cache/siamkit) under a fingerprint of the machine: CPU
model, the ISA torch dispatches to, torch's thread count and torch's version. A restart on the same
machine measures nothing; another machine, thread count or torch version measures again. ``--cache-dir
none`` (no decoded cache) keeps this small file in the default folder all the same: without it every run
would measure anew, and runs on one machine could compute differently where two kernels are within the
timing noise. A cache that cannot be written costs one warning line.
Training stores the choices in its checkpoints and a resumed run takes them from there (``known``).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import winograd
from .accel import (
    KERNEL_NAMES, PYTORCH, SWAPPED, ConvShape, conv2d_swapped_weight_grad, kernel_applies, shape_of, swappable,
)
from .data.cache import default_cache_dir
from .errors import warn
from .fileio import atomic_write_json
from .progress import progress_bar

WINOGRAD2, WINOGRAD4 = winograd.F2.name, winograd.F4.name
KERNELS = KERNEL_NAMES  # pytorch, swapped, winograd2, winograd4
CACHE_FILE = "cpu-tuning.json"
# A new VERSION (other candidates, other timing) measures everything again. 2: the whole convolution is timed,
# with the Winograd candidates; version 1 timed the weight gradient alone, between PyTorch's and the swap.
FORMAT, VERSION = "siamkit-cpu-tuning", 2
REPS = 3  # timed calls per candidate, interleaved, after one warm-up call each (oneDNN builds its kernel then)
# Another kernel is taken only when its fastest call beats PyTorch's by this factor: a near tie keeps PyTorch's
# own kernel, and a second measurement of a tie (another machine of the same kind) then picks the same.
MARGIN = 0.97
# A candidate this many times slower than the fastest after a timed round has lost: it is not timed again,
# and the timing stops when one candidate is left. This bounds the tuning's time: no shape is skipped
# unmeasured, but the clear losers (the swap on a 3-channel first layer, 4-8x slower; on strided 1x1
# shortcuts, where it computes 4x the outputs it uses; F(4x4, 3x3) on 2x2 maps) get one timed call.
CLEAR_GAP = 2.0

Timer = Callable[[], float]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_fingerprint() -> str:
    """What the measured speeds depend on besides the shape: one line, the cache's key."""
    return (
        f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads "
        f"| torch {torch.__version__}"
    )


def conv_shapes(model: nn.Module, forward: Callable[[], object]) -> dict[ConvShape, int]:
    """The shapes (and how many calls have each) that ``forward()`` runs the swappable convolutions of ``model`` at."""
    seen: dict[ConvShape, int] = {}

    def record(conv, inputs, output):
        shape = shape_of(conv, inputs[0])
        seen[shape] = seen.get(shape, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if swappable(m)]
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def candidates(shape: ConvShape) -> list[str]:
    """The kernels that can compute ``shape``, PyTorch's own first."""
    return [k for k in KERNELS if kernel_applies(k, shape)]


_CONV = {
    PYTORCH: lambda x, w, shape: F.conv2d(x, w, None, shape.stride, shape.padding),
    SWAPPED: lambda x, w, shape: conv2d_swapped_weight_grad(x, w, None, shape.stride, shape.padding),
    **{name: (lambda x, w, shape, s=scheme: winograd.conv3x3_winograd(x, w, None, s)) for name, scheme in winograd.SCHEMES.items()},
}


def candidate_calls(shape: ConvShape) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """One training call of each candidate on random tensors of ``shape``: forward, then input and weight gradients.

    Every candidate gets the same input, weight and output gradient (the input's memory format for all three).
    A call returns (output, input gradient, weight gradient).
    """
    fmt = torch.channels_last if shape.channels_last else torch.contiguous_format
    dtype = getattr(torch, shape.dtype)
    n, h, w = shape.input
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, shape.in_channels, h, w, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    weight = torch.randn(shape.out_channels, shape.in_channels, *shape.kernel, generator=g, dtype=dtype)
    grad_out = torch.randn(n, shape.out_channels, *shape.output, generator=g, dtype=dtype)
    x, weight = x.requires_grad_(), weight.contiguous(memory_format=fmt).requires_grad_()
    grad_out = grad_out.contiguous(memory_format=fmt)

    def call(kernel: str) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            y = _CONV[kernel](x, weight, shape)
            return (y.detach(), *torch.autograd.grad(y, (x, weight), grad_out))

    return {name: (lambda k=name: call(k)) for name in candidates(shape)}


def time_calls(calls: Mapping[str, Callable[[], object]], reps: int = REPS, timer: Timer = time.perf_counter) -> dict[str, float]:
    """The fastest of up to ``reps`` timed calls of each, after one warm-up call each.

    Interleaved, every other round in reverse order, so a slow moment of the machine hits all candidates
    alike; the fastest call, since interference only ever adds time. After each round a candidate
    CLEAR_GAP times slower than the fastest is not timed again, and the timing stops when one is left:
    more calls of a clear loser only cost time.
    """
    names = list(calls)
    for name in names:
        calls[name]()
    best = {name: float("inf") for name in names}
    running = list(names)
    for rep in range(reps):
        for name in running if rep % 2 == 0 else reversed(running):
            start = timer()
            calls[name]()
            best[name] = min(best[name], timer() - start)
        fastest = min(best.values())
        running = [name for name in running if best[name] < CLEAR_GAP * fastest]
        if len(running) <= 1:
            break
    return best


def measure_shape(shape: ConvShape) -> dict[str, float]:
    """Seconds per training call (forward and both gradients) of ``shape``, by each candidate, on this machine."""
    return time_calls(candidate_calls(shape))


def pick(seconds: Mapping[str, float]) -> str:
    """The fastest candidate; PyTorch's own unless another wins by more than the noise (MARGIN)."""
    others = {k: v for k, v in seconds.items() if k != PYTORCH}
    if not others:
        return PYTORCH
    best = min(others, key=others.__getitem__)
    return best if others[best] < MARGIN * seconds[PYTORCH] else PYTORCH


@dataclass
class Choices:
    """The kernel of each shape, and where each choice came from (for the run's log line)."""

    kernels: dict[ConvShape, str] = field(default_factory=dict)
    from_checkpoint: int = 0
    from_cache: int = 0
    measured: int = 0
    seconds: float = 0.0  # spent measuring
    cache: Path | None = None
    saved: bool = False

    def summary(self) -> str:
        counts = {k: sum(v == k for v in self.kernels.values()) for k in KERNEL_NAMES}
        where = [
            f"{self.from_checkpoint} from the checkpoint" if self.from_checkpoint else "",
            f"{self.from_cache} from {self.cache}" if self.from_cache else "",
            f"{self.measured} measured on this machine in {self.seconds:.1f} s" if self.measured else "",
        ]
        return (
            f"--cpu-tuning auto: convolutions of {len(self.kernels)} shapes: {counts[WINOGRAD4]} by Winograd F(4x4,3x3), "
            f"{counts[WINOGRAD2]} by Winograd F(2x2,3x3), {counts[SWAPPED]} with the swapped weight gradient, "
            f"{counts[PYTORCH]} by PyTorch's own ({'; '.join(w for w in where if w)})"
        )

    def to_dict(self) -> dict[str, str]:
        """{shape key: kernel}: what a checkpoint stores."""
        return {s.key(): k for s, k in self.kernels.items()}


def cache_file(cache_dir: str | None) -> Path:
    """Where the choices are cached: in ``--cache-dir``, or the default cache folder (also for ``none``)."""
    if cache_dir is None or str(cache_dir).lower() == "none":
        return default_cache_dir() / CACHE_FILE
    return Path(cache_dir) / CACHE_FILE


def read_cache(path: Path | None) -> dict:
    """The cache file's content; an empty one where there is none or it does not check out (then rewritten)."""
    empty = {"format": FORMAT, "version": VERSION, "machines": {}}
    if path is None:
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty
    ok = isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
    if not ok or not isinstance(data.get("machines"), dict):
        return empty
    data["machines"] = {k: v for k, v in data["machines"].items() if isinstance(v, dict)}
    return data


def write_cache(path: Path, machine: str, kernels: Mapping[ConvShape, str]) -> bool:
    """Add this machine's choices to the cache file (atomically); False, with one warning line, if it cannot."""
    data = read_cache(path)  # read again: another process may have added its machine or shapes meanwhile
    entry = data["machines"].setdefault(machine, {})
    entry.update({s.key(): k for s, k in kernels.items()})
    try:
        atomic_write_json(path, data)
    except OSError as e:  # fileio's WriteError is an OSError: "could not write FILE: why; what to do"
        why = str(e).split("; ")[0]
        warn(f"--cpu-tuning auto: the measured kernels are not cached ({why}); training goes on, and the next run "
             f"measures again (--cache-dir picks another folder)")
        return False
    return True


def choose(
    shapes: Mapping[ConvShape, int] | list[ConvShape], *, known: Mapping[str, str] | None = None,
    cache: Path | None = None, machine: str | None = None,
    measure: Callable[[ConvShape], Mapping[str, float]] | None = None, progress: bool = False,
) -> Choices:
    """The kernel of each shape: from ``known`` (a resumed checkpoint's), else the cache, else measured now.

    Measured choices are added to the cache file (``cache``; None: none) for the next run on this machine. ``measure``: seconds
    per candidate of a shape (default measure_shape); ``machine``: the cache's key (default this machine's).
    """
    measure = measure or measure_shape
    known = dict(known or {})
    machine = machine or machine_fingerprint()
    cached = read_cache(cache)["machines"].get(machine, {})
    out = Choices(cache=cache)
    todo = []
    for shape in shapes:
        key = shape.key()
        if kernel_applies(known.get(key), shape):
            out.kernels[shape] = known[key]
            out.from_checkpoint += 1
        elif kernel_applies(cached.get(key), shape):
            out.kernels[shape] = cached[key]
            out.from_cache += 1
        else:
            todo.append(shape)
    start = time.perf_counter()
    for shape in progress_bar(todo, desc="measuring convolution kernels", unit="shape", disable=not (progress and todo),
                              leave=False):
        out.kernels[shape] = pick(measure(shape))
    out.measured, out.seconds = len(todo), time.perf_counter() - start
    if todo and cache is not None:
        out.saved = write_cache(cache, machine, {s: out.kernels[s] for s in todo})
    return out
