"""Checkpoints: complete, exact to resume from, pruned as asked, loaded without running code, and kept safe
from numerical faults. Training runs in-process here (a few steps of a small real network on real data)."""
from __future__ import annotations

import builtins
import math
import random
import re

import numpy as np
import pytest
import torch

import siamkit
from siamkit.errors import SiamkitError
from siamkit.eval.protocol import evaluate
from siamkit.data.sources import load_source, split_identities
from siamkit.data.transforms import Preprocess
from siamkit.api import load_model
from siamkit.train import loop, run
from siamkit.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from siamkit.train.loop import train
from tiny_run import (  # noqa: F401
    BACKBONE, Crash, assert_identical, crash_after_checkpoint, load_raw, metrics_rows, one_torch_thread, tiny_config,
)


def att_subset(att_faces, root, n):
    """AT&T identities s1..sN as symlinks (10 images each)."""
    root.mkdir()
    for i in range(1, n + 1):
        (root / f"s{i}").symlink_to(att_faces / f"s{i}")
    return root


@pytest.fixture(scope="module")
def three_ids(att_faces, tmp_path_factory):
    """30 images: 30 anchors // batch 8 = 3 steps per epoch."""
    return att_subset(att_faces, tmp_path_factory.mktemp("att") / "three", 3)


def test_checkpoint_holds_everything_a_run_needs(tmp_path, three_ids):
    cfg = tiny_config(tmp_path / "run", data=str(three_ids), steps=4, keep_checkpoints=3, warmup_steps=1)
    train(cfg, progress=False)
    # --keep-checkpoints 3: the newest three numbered checkpoints, plus last.pt.
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.pt", "step-2.pt", "step-3.pt", "step-4.pt"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-2.pt")
    assert ckpt["format"] == FORMAT and ckpt["siamkit_version"] == siamkit.__version__
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["step"] == 2
    # 30 anchor images // 8 per batch = 3 steps per epoch: step 2 is in epoch 0, step 4 in epoch 1.
    assert ckpt["epoch"] == 0 and load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    assert ckpt["sampler"] == {"type": "TupleSampler", "seed": 0, "step": 2, "steps_per_epoch": 3, "world": 1}
    model_keys = set(ckpt["model"])
    assert any("running_mean" in k for k in model_keys) and any("weight" in k for k in model_keys)
    # Adam's moments for every trainable tensor, after two updates.
    opt = ckpt["optimizer"]
    n_params = sum(1 for k, v in ckpt["model"].items() if v.is_floating_point() and "running" not in k)
    assert len(opt["state"]) == n_params
    assert all(float(s["step"]) == 2 and {"exp_avg", "exp_avg_sq"} <= s.keys() for s in opt["state"].values())
    # Warm-up of 1 step then cosine over the remaining 3: after 2 steps the factor is cos-decayed by 1/3.
    expected_lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * (2 - 1) / (4 - 1)))
    assert ckpt["scheduler"]["last_epoch"] == 2
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(expected_lr, rel=1e-12)
    assert opt["param_groups"][0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert ckpt["scaler"] is not None
    assert {"python", "numpy", "torch"} <= ckpt["rng"].keys()
    assert ckpt["identities"] == ["s1", "s2", "s3"]
    assert ckpt["model_spec"]["backbone"] == BACKBONE and ckpt["preprocess"]["image_size"] == [32, 32]
    assert ckpt["log_window"]["n"] == 0  # log_every 1: nothing pending between rows


def test_rng_states_restore_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    first = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # move every generator elsewhere
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert again == first


def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch):
    """Crash right after the checkpoint of step 3 (between two metrics rows), resume: same weights, same log."""
    steps = 4
    ref = tiny_config(tmp_path / "ref", steps=steps, log_every=2)
    train(ref, progress=False)

    crash_after_checkpoint(monkeypatch, 3)
    cfg = tiny_config(tmp_path / "run", steps=steps, log_every=2)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    monkeypatch.undo()
    crashed = load_raw(tmp_path / "run" / "checkpoints" / "last.pt")
    assert crashed["step"] == 3 and crashed["log_window"]["n"] == 1  # step 3 waits for the row of step 4
    train(cfg, resume=True, progress=False)

    a = load_raw(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_raw(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "sampler", "rng"):
        assert_identical(a[key], b[key], key)
    rows_a, rows_b = metrics_rows(tmp_path / "ref"), metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows_b] == ["2", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["step"], ra["epoch"], ra["loss"], ra["metric"], ra["lr"]) == (
            rb["step"], rb["epoch"], rb["loss"], rb["metric"], rb["lr"]
        )
    assert float(rows_b[-1]["elapsed_s"]) > float(rows_b[0]["elapsed_s"])


def test_best_is_the_checkpoint_with_the_best_held_out_accuracy(tmp_path, att_faces, monkeypatch):
    data = att_subset(att_faces, tmp_path / "five", 5)
    # The final report's plots are not under test; eval/report.py's histogram also fails on the nearly
    # constant scores of a 4-step model (np.histogram_bin_edges: "Too many bins for data range").
    monkeypatch.setattr(loop, "write_report", lambda *args: None)
    cfg = tiny_config(tmp_path / "run", data=str(data), steps=4, val_identities=2, eval_every=1, keep_checkpoints=4)
    train(cfg, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    best = load_checkpoint(ckpts / "best.pt")
    # Re-evaluate the checkpoints of steps 1-3 (the in-training evaluations) independently of the loop.
    pre = Preprocess.from_dict(best["preprocess"])
    _, val = split_identities(load_source(str(data), pre), 2, 0)
    assert val.n_identities == 2
    accuracy = []
    for step in (1, 2, 3):
        model, ck = load_model(ckpts / f"step-{step}.pt")
        model = model.to(memory_format=torch.channels_last)  # as in training: the same kernels, the same scores
        accuracy.append(evaluate(model, pre, val, score=ck["score"], seed=0)[0]["accuracy_mean"])
    best_step = 1 + int(np.argmax(accuracy))  # the first of equal accuracies: a tie does not replace best.pt
    assert best["step"] == best_step, accuracy
    assert best["best_accuracy"] == pytest.approx(max(accuracy), abs=1e-12)
    assert "threshold" in best
    assert_identical(best["model"], load_checkpoint(ckpts / f"step-{best_step}.pt")["model"], "best.pt model")


# --- safe loading -----------------------------------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls builtins.exec: the shape of a malicious checkpoint from the internet."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": RunsCode(marker)}, evil)
    # The payload is live: a plain (unsafe) load runs it. Prove that on a copy with its own marker.
    probe_marker = tmp_path / "PROBE"
    torch.save({"model": RunsCode(probe_marker)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe_marker.read_text() == "code ran"

    with pytest.raises(SiamkitError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert message == (
        f"refused to load {evil}: unpickling it would call exec, which is not tensor or plain data; "
        f"siamkit never runs code from a checkpoint, so use only checkpoints siamkit wrote"
    )
    assert not marker.exists()


def _real_checkpoint(tmp_path) -> bytes:
    save_checkpoint(tmp_path / "real.pt", {"model": {"w": torch.arange(10_000.0)}, "step": 1})
    return (tmp_path / "real.pt").read_bytes()


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("truncated", r"is not a readable checkpoint \(truncated, damaged or not a PyTorch file: \w+\); use another"),
        ("empty", r"is not a readable checkpoint \(truncated, damaged or not a PyTorch file: EOFError\)"),
        ("text", r"is not a readable checkpoint"),
        ("random", r"is not a readable checkpoint"),
        ("foreign", r"is a PyTorch file but not a siamkit checkpoint \(no 'siamkit-checkpoint-v1' tag\)"),
        ("state_dict", r"is a PyTorch file but not a siamkit checkpoint"),
        ("future", r"is a siamkit checkpoint in format 'siamkit-checkpoint-v7' \(written by siamkit 9\.0\.0\); "
                   r"this siamkit .* reads only 'siamkit-checkpoint-v1'"),
    ],
)
def test_unusable_files_get_one_clear_line(tmp_path, kind, pattern):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = _real_checkpoint(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("step,loss\n1,0.5\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3), "epoch": 5}, path)
    elif kind == "state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif kind == "future":
        torch.save({"format": "siamkit-checkpoint-v7", "siamkit_version": "9.0.0", "model": {}}, path)
    with pytest.raises(SiamkitError) as info:
        load_checkpoint(path)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


# --- numerical faults --------------------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capfd):
    """Calls 3 (NaN loss) and 4 (finite loss, NaN gradient) are skipped; 7-9 stop the run at --max-bad-steps 3."""
    snapshots: dict[int, dict] = {}
    calls = [0]

    class FaultyStep(run.TrainStep):
        def forward(self, x, labels):
            calls[0] += 1
            snapshots[calls[0]] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            out = super().forward(x, labels)
            if calls[0] in (3, 7, 8, 9):
                out = {**out, "loss": out["loss"] * float("nan")}
            if calls[0] == 4:
                first = next(p for p in self.model.parameters() if p.requires_grad)
                # sqrt at 0: the value is 0 (the loss stays finite) but its gradient is infinite * 0 = NaN.
                out = {**out, "loss": out["loss"] + (first.flatten()[0] * 0).abs().sqrt()}
                assert torch.isfinite(out["loss"])
            return out

    monkeypatch.setattr(run, "TrainStep", FaultyStep)
    cfg = tiny_config(tmp_path / "run", steps=12, checkpoint_every=2, keep_checkpoints=10, max_bad_steps=3)
    with pytest.raises(SiamkitError) as info:
        train(cfg, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert str(info.value) == (
        f"3 non-finite steps in a row (steps 7-9): training stopped; the last good checkpoint {ckpts / 'last.pt'} "
        f"(step 6) is intact; lower --lr or check the data (--max-bad-steps sets the limit)"
    )
    warnings = [l for l in capfd.readouterr().err.splitlines() if "non-finite" in l]
    assert warnings == [
        "siamkit: warning: step 3: non-finite loss or gradient; step skipped (1 in a row)",
        "siamkit: warning: step 4: non-finite loss or gradient; step skipped (2 in a row)",
        "siamkit: warning: step 7: non-finite loss or gradient; step skipped (1 in a row)",
        "siamkit: warning: step 8: non-finite loss or gradient; step skipped (2 in a row)",
        "siamkit: warning: step 9: non-finite loss or gradient; step skipped (3 in a row)",
    ]
    # Skipped steps change nothing, BatchNorm statistics included; good steps do.
    assert_identical(snapshots[3], snapshots[5], "weights before step 3 vs before step 5")
    assert_identical(snapshots[7], snapshots[9], "weights before step 7 vs before step 9")
    assert not torch.equal(
        next(v for k, v in snapshots[6].items() if "running_mean" in k),
        next(v for k, v in snapshots[5].items() if "running_mean" in k),
    )
    # The last checkpoint is the good one of step 6: no NaN anywhere, equal to the weights the run held then.
    last = load_checkpoint(ckpts / "last.pt")
    assert last["step"] == 6
    assert_identical(last["model"], snapshots[7], "last.pt vs weights before step 7")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    # Skipped steps still advance the schedule (the same step numbers as a run without faults).
    assert last["scheduler"]["last_epoch"] == 6
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == ["1", "2", "5", "6"]
