"""--ema-decay: the moving average of the weights against a hand computation, the steps it follows, and the
weights a run evaluates and ships (its resume exactness is in test_resume.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from siamkit.config import TrainConfig
from siamkit.errors import SiamkitError
from siamkit.train.ema import WeightEMA, evaluation_weights, warmup_decay
from tiny_run import assert_identical, load_raw, one_torch_thread, tiny_config  # noqa: F401

FLOAT32_EPS = torch.finfo(torch.float32).eps


class TinyNet(nn.Module):
    """A layer, a BatchNorm (float running stats and an integer counter) and a classifier head."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.bn(self.layer(x)))


def test_warmup_decay_follows_the_formula_and_stops_at_the_decay():
    assert warmup_decay(0.99, 0) == pytest.approx(1 / 10)
    assert warmup_decay(0.99, 5) == pytest.approx(6 / 15)
    assert warmup_decay(0.15, 1) == 0.15  # 2/11 > 0.15: the decay itself
    assert warmup_decay(0.99, 890) == 0.99  # (10 * 0.99 - 1) / (1 - 0.99) = 890 updates reach it
    assert warmup_decay(0.99, 880) < 0.99


def test_three_updates_equal_a_hand_computation_buffers_averaged_counters_copied():
    torch.manual_seed(0)
    net = TinyNet()
    decay = 0.15  # warm-up decays 1/10 then min(0.15, 2/11) = min(0.15, 3/12) = 0.15: both branches of the min
    ema = WeightEMA(net, decay)
    averaged = [n for n in net.state_dict() if not n.startswith("classifier.") and n != "bn.num_batches_tracked"]
    expected = {n: net.state_dict()[n].double().clone() for n in averaged}  # the EMA starts at the model
    largest = {n: e.abs().max().item() for n, e in expected.items()}  # M: the largest magnitude an update sees
    gen = torch.Generator().manual_seed(1)
    for d in (0.1, 0.15, 0.15):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))  # an "optimizer step"
        net.train()(torch.randn(8, 3, generator=gen))  # moves the BatchNorm running statistics
        ema.update()
        live = net.state_dict()
        for n in averaged:
            expected[n] = d * expected[n] + (1 - d) * live[n].double()
            largest[n] = max(largest[n], live[n].abs().max().item(), expected[n].abs().max().item())
    assert ema.updates == 3
    assert sorted(ema.averages) == sorted(averaged + ["bn.num_batches_tracked"])  # no classifier
    for n in averaged:
        # Each update is a float32 lerp a + w (b - a) (or b - (1 - w)(b - a)) with |a|, |b| <= M: the
        # difference rounds by <= eps M, the weight (rounded to float32) and the product by <= eps M each,
        # the sum by <= eps M / 2, so <= 3.5 eps M per update, while the error carried from the last update
        # is scaled by d <= 1: 3 updates stay below 10.5 eps M. Allowed: 12 eps M (the reference is float64).
        got = ema.averages[n]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[n], rtol=0, atol=12 * FLOAT32_EPS * largest[n], msg=n)
    # Averaged, not copied: the running statistics' average is not the statistics now.
    assert not torch.allclose(ema.averages["bn.running_mean"], net.bn.running_mean)
    counter = ema.averages["bn.num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.item() == 3 == net.bn.num_batches_tracked.item()  # copied
    # The state a checkpoint keeps as its model: the averages, and the classifier as trained.
    state = ema.model_state()
    assert_identical(state["classifier.weight"], net.classifier.weight.detach(), "classifier")
    assert_identical(state["layer.weight"], ema.averages["layer.weight"], "layer")


def test_applied_puts_the_averages_in_and_the_trained_weights_back_bit_for_bit():
    torch.manual_seed(0)
    net = TinyNet()
    ema = WeightEMA(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    trained = {n: t.clone() for n, t in net.state_dict().items()}
    with evaluation_weights(ema):
        inside = {n: t.clone() for n, t in net.state_dict().items()}
    for n, avg in ema.averages.items():
        assert_identical(inside[n], avg, n)
    assert_identical(inside["classifier.weight"], trained["classifier.weight"])
    assert_identical(net.state_dict(), trained, "after")
    with pytest.raises(RuntimeError), evaluation_weights(ema):
        raise RuntimeError("an evaluation that fails")
    assert_identical(net.state_dict(), trained, "after a failed evaluation")
    with evaluation_weights(None):  # no EMA: the model's own weights
        assert_identical(net.state_dict(), trained, "without EMA")


def test_a_skipped_non_finite_step_leaves_the_average_unchanged(tmp_path):
    from siamkit.train.run import build_training
    from siamkit.train.step import optimisation_step

    cfg = tiny_config(tmp_path / "run", ema_decay=0.5, cpu_tuning="off")
    t = build_training(cfg, n_classes=4, in_channels=3, device=torch.device("cpu"), total=4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.n_branches * cfg.batch_size, 3, 32, 32, generator=gen)
    y = torch.arange(len(x)) % 4
    before = {n: a.clone() for n, a in t.ema.averages.items()}
    result = optimisation_step(t, x * float("nan"), y)
    assert result.skipped
    assert t.ema.updates == 0
    assert_identical(t.ema.averages, before, "EMA after a skipped step")
    result = optimisation_step(t, x, y)
    assert not result.skipped and t.ema.updates == 1
    moved = [n for n, a in t.ema.averages.items() if a.is_floating_point() and not torch.equal(a, before[n])]
    assert "embedding.fc.weight" in moved and any(n.endswith("running_mean") for n in moved)


def test_the_run_evaluates_calibrates_and_ships_the_average(tmp_path, monkeypatch):
    """The held-out report is of the EMA weights, and siamkit.load gets them; --resume's weights are the trained ones."""
    import siamkit
    from siamkit.train import loop
    from siamkit.train.loop import train

    evaluated = []
    real_evaluate = loop.evaluate

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({n: v.clone() for n, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", recording_evaluate)
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, steps=3, ema_decay=0.5, val_identities=3, cpu_tuning="off"), progress=False)
    ckpt = load_raw(run_dir / "checkpoints" / "last.pt")
    assert ckpt["ema"] == {"decay": 0.5, "updates": 3}
    assert not torch.equal(ckpt["model"]["embedding.fc.weight"], ckpt["trained_model"]["embedding.fc.weight"])
    assert len(evaluated) == 1
    assert_identical(evaluated[0], ckpt["model"], "the evaluated weights vs the checkpoint's EMA")
    loaded = siamkit.load(run_dir)
    assert_identical(loaded.model.state_dict(), ckpt["model"], "siamkit.load vs the EMA")
    assert loaded.threshold == ckpt["threshold"]  # calibrated on the EMA's held-out scores, recorded above


def test_ema_decay_outside_zero_to_one_is_refused_in_one_line():
    for bad in (1.0, 1.5):
        with pytest.raises(SiamkitError, match=r"--ema-decay takes a decay in \[0, 1\)"):
            TrainConfig(ema_decay=bad).validate()
    with pytest.raises(SiamkitError, match="--ema-decay must be 0 or more"):
        TrainConfig(ema_decay=-0.1).validate()
    TrainConfig(ema_decay=0.0).validate()
    TrainConfig(ema_decay=0.999).validate()


def test_ema_added_on_resume_starts_from_the_restored_weights(tmp_path):
    """A run resumed with --ema-decay from a checkpoint without one: the average starts at the weights it continues
    from, not at the fresh model's random initialisation (resumed here at its last step: no update follows)."""
    from siamkit.train.loop import train

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, steps=2, cpu_tuning="off"), progress=False)
    plain = load_raw(run_dir / "checkpoints" / "last.pt")
    train(tiny_config(run_dir, steps=2, cpu_tuning="off", ema_decay=0.5), resume=True, progress=False)
    resumed = load_raw(run_dir / "checkpoints" / "last.pt")
    assert resumed["ema"] == {"decay": 0.5, "updates": 0}
    assert_identical(resumed["trained_model"], plain["model"], "trained weights")
    assert_identical(resumed["model"], plain["model"], "the average")
