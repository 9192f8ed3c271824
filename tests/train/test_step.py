"""The step's finite check (train/step.py gradients_finite) against a direct check of every entry."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from siamkit.train.step import gradients_finite


def params_with(grads: list[torch.Tensor | None]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(3) if g is None else torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return params


FINITE = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[3.0, 4.0], [-5.0, 6.0]])]
CASES = {
    "all finite": FINITE,
    "a NaN": [FINITE[0], torch.tensor([[3.0, math.nan], [-5.0, 6.0]])],
    "an inf": [torch.tensor([1.0, math.inf, 0.5]), FINITE[1]],
    # +inf and -inf in different tensors: their sum is NaN, still caught
    "inf and -inf": [torch.tensor([math.inf, 0.0, 0.0]), torch.tensor([[-math.inf, 0.0], [0.0, 0.0]])],
    # every entry finite, but their float32 sum overflows to inf: the exact check decides (finite)
    "overflowing sum": [torch.tensor([3e38, 3e38, 3e38]), torch.tensor([[3e38, 0.0], [0.0, 0.0]])],
    "overflowing sum and a NaN": [torch.tensor([3e38, 3e38, 3e38]), torch.tensor([[math.nan, 0.0], [0.0, 0.0]])],
    "some without gradients": [None, FINITE[1], None],
}


@pytest.mark.parametrize("name", CASES)
def test_gradients_finite_is_true_exactly_when_every_entry_is_finite(name):
    grads = CASES[name]
    expected = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
    got = gradients_finite(params_with(grads))
    assert got.dtype == torch.bool and got.shape == ()
    assert bool(got) is expected
    assert expected is (name in ("all finite", "overflowing sum", "some without gradients"))  # the cases mean what they say


def test_no_gradients_at_all_is_finite():
    assert bool(gradients_finite(params_with([None, None])))
    assert bool(gradients_finite([]))


def test_a_skipped_first_step_moves_the_schedule_without_a_torch_warning(tmp_path):
    """A NaN first batch is skipped and the schedule still counts it; torch's "scheduler before optimizer" warning
    is about a misuse that did not happen, so the step filters that one warning out."""
    import warnings

    from siamkit.train.run import build_training
    from siamkit.train.step import optimisation_step
    from tiny_run import tiny_config

    cfg = tiny_config(tmp_path / "run", cpu_tuning="off")
    t = build_training(cfg, n_classes=4, in_channels=3, device=torch.device("cpu"), total=4)
    x = torch.randn(cfg.n_branches * cfg.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(len(x)) % 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = optimisation_step(t, x * float("nan"), y)
    assert result.skipped
    assert t.scheduler.last_epoch == 1  # the skipped step counted
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
