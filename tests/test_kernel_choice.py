"""Measure-and-pick of convolution kernels (siamkit/kernel_choice.py): the candidates, the choice, its cache, its timing loop.

Speeds are faked (a fake clock that each candidate advances, or a fake ``measure``): no test depends on timing.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from siamkit import kernel_choice
from siamkit.accel import ConvShape
from siamkit.kernel_choice import (
    CLEAR_GAP, MARGIN, PYTORCH, REPS, SWAPPED, WINOGRAD2, WINOGRAD4, cache_file, candidates, choose, conv_shapes, pick,
    time_calls,
)

A = ConvShape(256, 256, (3, 3), (1, 1), (1, 1), (96, 4, 4), True, "float32")
B = ConvShape(64, 64, (3, 3), (1, 1), (1, 1), (96, 16, 16), True, "float32")
MACHINE = "Some CPU | AVX2 | 2 threads | torch 2.x"


class FakeClock:
    """A timer that only the candidates move: each call of a candidate advances it by that candidate's cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: dict[str, int] = {}

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, seconds: float):
        def call():
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now += seconds
        return call


@pytest.mark.parametrize("pytorch_s, swapped_s, expected", [(2.0, 1.0, SWAPPED), (1.0, 2.0, PYTORCH), (1.0, 0.984375, PYTORCH)])
def test_the_faster_candidate_is_picked(pytorch_s, swapped_s, expected):
    clock = FakeClock()
    calls = {PYTORCH: clock.candidate(PYTORCH, pytorch_s), SWAPPED: clock.candidate(SWAPPED, swapped_s)}
    seconds = time_calls(calls, timer=clock)
    assert seconds == {PYTORCH: pytorch_s, SWAPPED: swapped_s}
    assert pick(seconds) == expected  # 63/64 s against 1 s: within MARGIN, a tie, PyTorch's own is kept
    assert MARGIN < 0.984375  # what makes the last case a tie (63/64: exact in binary, as the fake clock needs)


def test_the_fastest_of_four_is_picked_and_a_near_tie_keeps_pytorchs_own():
    seconds = {PYTORCH: 1.0, SWAPPED: 0.9, WINOGRAD2: 0.8, WINOGRAD4: 0.7}
    assert pick(seconds) == WINOGRAD4
    assert pick({**seconds, WINOGRAD4: 1.5}) == WINOGRAD2
    assert pick({PYTORCH: 1.0, SWAPPED: 0.984375, WINOGRAD4: 0.99}) == PYTORCH  # every other within MARGIN: a tie
    assert pick({PYTORCH: 1.0}) == PYTORCH  # a shape only PyTorch's own computes


def test_the_fastest_call_counts_and_a_clear_loser_is_not_timed_again():
    clock = FakeClock()
    # The swap's first timed call is slow (the machine was busy), the later ones fast: the fastest call wins.
    costs = iter([5.0, 1.5] + [0.75] * REPS)  # warm-up (oneDNN builds its kernel), then the timed calls
    calls = {PYTORCH: clock.candidate(PYTORCH, 1.0), SWAPPED: lambda: clock.candidate(SWAPPED, next(costs))()}
    assert time_calls(calls, reps=REPS, timer=clock) == {PYTORCH: 1.0, SWAPPED: 0.75}
    assert clock.calls == {PYTORCH: 1 + REPS, SWAPPED: 1 + REPS}
    clock = FakeClock()
    calls = {PYTORCH: clock.candidate(PYTORCH, 1.0), SWAPPED: clock.candidate(SWAPPED, CLEAR_GAP)}
    time_calls(calls, reps=REPS, timer=clock)
    assert clock.calls == {PYTORCH: 2, SWAPPED: 2}  # warm-up and one timed round: the gap is clear
    # With more candidates a clear loser drops out and the close ones go on being timed.
    clock = FakeClock()
    calls = {PYTORCH: clock.candidate(PYTORCH, 1.0), SWAPPED: clock.candidate(SWAPPED, 0.875),  # exact in binary, as the fake clock needs
             WINOGRAD4: clock.candidate(WINOGRAD4, 2 * CLEAR_GAP)}
    assert time_calls(calls, reps=REPS, timer=clock) == {PYTORCH: 1.0, SWAPPED: 0.875, WINOGRAD4: 2 * CLEAR_GAP}
    assert clock.calls == {PYTORCH: 1 + REPS, SWAPPED: 1 + REPS, WINOGRAD4: 2}


def test_winograd_is_a_candidate_for_3x3_stride_1_channels_last_only():
    assert candidates(A) == [PYTORCH, SWAPPED, WINOGRAD2, WINOGRAD4]  # 3x3, stride 1, padding 1, channels-last
    strided = ConvShape(256, 512, (3, 3), (2, 2), (1, 1), (96, 4, 4), True, "float32")
    nchw = ConvShape(256, 256, (3, 3), (1, 1), (1, 1), (96, 4, 4), False, "float32")
    pointwise = ConvShape(64, 128, (1, 1), (1, 1), (0, 0), (96, 8, 8), True, "float32")
    unpadded = ConvShape(64, 64, (3, 3), (1, 1), (0, 0), (96, 8, 8), True, "float32")
    for shape in (strided, nchw, pointwise, unpadded):
        assert candidates(shape) == [PYTORCH, SWAPPED]


class FakeMeasure:
    """Measured seconds per shape, counting what was measured."""

    def __init__(self, winner: str = SWAPPED):
        self.winner, self.shapes = winner, []

    def __call__(self, shape: ConvShape) -> dict[str, float]:
        self.shapes.append(shape)
        return {PYTORCH: 1.0, SWAPPED: 1.0, self.winner: 0.5}


def test_choices_are_cached_per_machine_and_reused_after_a_restart(tmp_path):
    cache = tmp_path / "cache" / "cpu-tuning.json"
    first = FakeMeasure(SWAPPED)
    got = choose([A, B], cache=cache, machine=MACHINE, measure=first)
    assert first.shapes == [A, B]
    assert got.kernels == {A: SWAPPED, B: SWAPPED}
    assert (got.measured, got.from_cache, got.saved) == (2, 0, True)
    assert json.loads(cache.read_text())["machines"] == {MACHINE: {A.key(): SWAPPED, B.key(): SWAPPED}}

    # A restart on the same machine: nothing measured.
    again = FakeMeasure(PYTORCH)
    got = choose([A, B], cache=cache, machine=MACHINE, measure=again)
    assert again.shapes == [] and got.kernels == {A: SWAPPED, B: SWAPPED} and got.from_cache == 2
    assert "2 from" in got.summary() and "2 with the swapped" in got.summary()

    # Another machine (or thread count, or torch version: all in the fingerprint) measures again, beside the first.
    other = FakeMeasure(PYTORCH)
    got = choose([A, B], cache=cache, machine=MACHINE.replace("torch 2.x", "torch 3.x"), measure=other)
    assert other.shapes == [A, B] and got.kernels == {A: PYTORCH, B: PYTORCH}
    assert len(json.loads(cache.read_text())["machines"]) == 2

    # A new shape on the known machine: only it is measured, and added.
    c = ConvShape(256, 256, (3, 3), (1, 1), (1, 1), (32, 4, 4), True, "float32")
    more = FakeMeasure(PYTORCH)
    choose([A, c], cache=cache, machine=MACHINE, measure=more)
    assert more.shapes == [c]
    assert json.loads(cache.read_text())["machines"][MACHINE] == {A.key(): SWAPPED, B.key(): SWAPPED, c.key(): PYTORCH}


def test_the_default_machine_fingerprint_names_cpu_isa_threads_and_torch():
    line = kernel_choice.machine_fingerprint()
    assert torch.backends.cpu.get_cpu_capability() in line and torch.__version__ in line
    assert f"{torch.get_num_threads()} threads" in line and kernel_choice.cpu_model() in line


def test_checkpoint_choices_are_reused_without_measuring(tmp_path):
    measure = FakeMeasure(PYTORCH)
    got = choose([A, B], known={A.key(): SWAPPED, B.key(): PYTORCH}, cache=tmp_path / "t.json", machine=MACHINE,
                 measure=measure)
    assert measure.shapes == [] and got.kernels == {A: SWAPPED, B: PYTORCH} and got.from_checkpoint == 2
    assert not (tmp_path / "t.json").exists()  # nothing measured, nothing to cache


def test_a_cache_that_cannot_be_written_costs_one_warning_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "cpu-tuning.json"  # under a file: not writable, even for root
    measure = FakeMeasure(SWAPPED)
    got = choose([A], cache=cache, machine=MACHINE, measure=measure)
    assert got.kernels == {A: SWAPPED} and not got.saved
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not cached" in warnings[0] and str(tmp_path / "a_file") in warnings[0]


def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path):
    cache = tmp_path / "cpu-tuning.json"
    ours = {"format": kernel_choice.FORMAT, "version": kernel_choice.VERSION}
    for damaged in ["{not json", json.dumps({"format": "other"}), json.dumps({**ours, "machines": {MACHINE: {A.key(): "bogus"}}}),
                    json.dumps({**ours, "machines": {MACHINE: ["not", "a", "table"]}})]:
        cache.write_text(damaged)
        measure = FakeMeasure(SWAPPED)
        assert choose([A], cache=cache, machine=MACHINE, measure=measure).kernels == {A: SWAPPED}
        assert measure.shapes == [A]
        assert json.loads(cache.read_text())["machines"][MACHINE] == {A.key(): SWAPPED}


def test_the_cache_is_in_the_decoded_caches_folder_and_stays_in_the_default_one_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SIAMKIT_CACHE_DIR", str(tmp_path))
    assert cache_file(None) == tmp_path / "cpu-tuning.json"  # the decoded cache's folder
    assert cache_file(str(tmp_path / "x")) == tmp_path / "x" / "cpu-tuning.json"
    assert cache_file("none") == cache_file("None") == tmp_path / "cpu-tuning.json"  # no decoded cache, same tuning
    for _ in range(2):  # no file at all (as the benchmark measures afresh): every call measures, nothing written
        measure = FakeMeasure(SWAPPED)
        choose([A], cache=None, machine=MACHINE, measure=measure)
        assert measure.shapes == [A]
    assert list(tmp_path.iterdir()) == []


def test_conv_shapes_are_those_each_convolution_is_called_at():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, groups=2))
    x = torch.zeros(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    shapes = conv_shapes(model, lambda: model(x))
    fmt = (True, "float32")
    assert shapes == {
        ConvShape(3, 4, (3, 3), (1, 1), (1, 1), (5, 6, 6), *fmt): 1,
        ConvShape(4, 4, (3, 3), (1, 1), (1, 1), (5, 6, 6), *fmt): 2,  # two layers, one shape
        ConvShape(4, 8, (1, 1), (2, 2), (0, 0), (5, 6, 6), *fmt): 1,
    }  # the grouped one cannot swap: not listed
    assert all(not m._forward_hooks for m in model)


@pytest.mark.parametrize("shape", [
    ConvShape(3, 4, (3, 3), (2, 2), (1, 1), (2, 7, 6), True, "float64"),  # strided: PyTorch's own and the swap
    ConvShape(3, 4, (3, 3), (1, 1), (1, 1), (2, 7, 6), True, "float64"),  # also both Winograd schemes
])
def test_real_candidates_compute_the_same_convolution(shape):
    """measure_shape times these calls: each must be a way to the same output and gradients as PyTorch's own."""
    calls = kernel_choice.candidate_calls(shape)
    assert list(calls) == candidates(shape)
    ref = calls[PYTORCH]()
    for name, call in calls.items():
        # float64: rounding only (the sums differ in order; Winograd's transforms scale terms by up to 8^2):
        # 1e-10 relative leaves five orders of magnitude above float64's rounding here and catches any real error.
        torch.testing.assert_close(call(), ref, rtol=1e-10, atol=1e-10, msg=name)
    seconds = kernel_choice.measure_shape(shape)
    assert set(seconds) == set(calls) and all(s > 0 for s in seconds.values())
