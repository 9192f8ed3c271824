"""A run's checkpoints (train/state.py): weights that are not finite are never saved; the run stops and keeps the
last finite checkpoint. Issue 28 item 4: on main 935a11e `--lr 1e6` ended with exit code 0 and NaN weights."""
from __future__ import annotations

import pytest
import torch

from siamkit.checkpoint import non_finite
from test_cli_bad_input import assert_one_error, run_main
from tiny_run import load_raw, one_torch_thread, tiny_args  # noqa: F401


def test_weights_that_overflow_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path, monkeypatch, capfd):
    from siamkit.train import loop

    real_step = loop.optimisation_step
    steps = {"done": 0}

    def step_then_overflow(training, x, y, stop):
        result = real_step(training, x, y, stop)
        steps["done"] += 1
        if steps["done"] == 3:  # step 3's update overflows a weight (a finite loss and gradient, a huge --lr)
            with torch.no_grad():
                weight = next(training.model.parameters())
                weight[(0,) * weight.ndim] = float("inf")
        return result

    monkeypatch.setattr(loop, "optimisation_step", step_then_overflow)
    out = tmp_path / "run"
    code, err = run_main(tiny_args(out, steps=5), capfd)  # a checkpoint after every step
    last = out / "checkpoints" / "last.pt"
    assert_one_error(code, err, "step 3: the model's weights are not finite (NaN or infinity in 1 tensor(s), e.g. ")
    assert f"training stopped without saving them; the last good checkpoint {last} (step 2) is intact" in err[-1]
    state = load_raw(last)
    assert state["step"] == 2 and non_finite(state["model"]) == []


@pytest.mark.parametrize("ema", [False, True])
def test_a_huge_learning_rate_fails_instead_of_saving_nan_weights(tmp_path, capfd, ema):
    # The case of the issue: with --lr 1e6 a step (step 4 here) updates the weights to infinity with a finite loss;
    # the non-finite steps after it stayed under --max-bad-steps, and on main 935a11e the run ended with exit code 0
    # and NaN in last.pt. Now the step-6 checkpoint is refused and the step-3 one kept.
    out = tmp_path / "run"
    args = ["train", "--data", "att", "--out", out, "--lr", "1e6", "--steps", "8", "--image-size", "32", "32",
            "--val-identities", "0", "--device", "cpu", "--no-progress", "--cpu-tuning", "off",
            "--checkpoint-every", "3", "--ema-decay", "0.99" if ema else "0"]
    code, err = run_main(args, capfd)
    assert_one_error(code, err, "the model's weights are not finite")
    assert f"the last good checkpoint {out / 'checkpoints' / 'last.pt'} (step 3) is intact" in err[-1]
    state = load_raw(out / "checkpoints" / "last.pt")
    assert state["step"] == 3 and non_finite(state["model"]) == []
