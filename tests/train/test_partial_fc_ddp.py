"""Partial FC across 2 processes (gloo on CPU): the sharded head against the full classifier on one process, its
sampling, its checkpoints (gathered, re-sharded), and a 2-process training run resumed bit for bit.

One group runs everything (tests/train/_partial_fc_workers.py): starting the processes is the expensive part.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_workers as workers  # noqa: E402
import _partial_fc_workers as pfc_workers  # noqa: E402

from siamkit.checkpoint import load_checkpoint  # noqa: E402

RUN = dict(data="digits", image_size=[32, 32], device="cpu", backbone="mobilenet_v3_small", embedding_dim=16,
           batch_size=4, val_identities=0, seed=0, log_every=1, schedule="constant", cpu_tuning="off",
           classifier="cosface", classifier_input="embedding", classifier_sample_rate=0.5)


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    base = tmp_path_factory.mktemp("pfc")
    record = base / "record"
    record.mkdir()
    runs = [
        ("straight", dict(RUN, steps=3, out=str(base / "straight")), {}),
        ("resumed", dict(RUN, steps=1, out=str(base / "resumed")), {}),
        ("resumed", dict(RUN, steps=3, out=str(base / "resumed")), {"resume": True}),
    ]
    workers.spawn(pfc_workers.all_checks, runs, str(record))
    return base, record


def test_head_checks_pass_on_both_processes(two_process):
    # R = 1 against the full heads (cosface, arcface), R < 1 sampling and loss, checkpoint gather and re-sharding:
    # the asserts run inside the processes (an error there fails the spawn); both got to the end.
    _, record = two_process
    assert sorted(p.name for p in record.glob("checks-*.ok")) == ["checks-rank0.ok", "checks-rank1.ok"]


def test_resumed_run_is_bit_exact(two_process):
    base, _ = two_process
    straight = load_checkpoint(base / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(base / "resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 3
    # The whole classifier, gathered from both processes, in a full classifier's layout.
    assert straight["model"]["classifier.weight"].shape == (10, 16) and straight["model_spec"]["n_classes"] == 10
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    for index, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][name]), (index, name)
    log = (base / "straight" / "train.log").read_text()
    assert "partial FC: 5 centres per process, 2 sampled per step" in log


def test_resuming_on_another_number_of_processes_is_refused_in_one_line(two_process, tmp_path):
    # The checkpoint's head would re-shard (checkpoint_checks: 2 -> 1 and 3 processes), but the run's samplers
    # split each step by process: --resume names the change instead of continuing with other draws.
    import shutil

    from siamkit.config import TrainConfig
    from siamkit.errors import SiamkitError
    from siamkit.train.loop import train

    base, _ = two_process
    copy = tmp_path / "run"
    shutil.copytree(base / "resumed", copy)
    before = sorted(p.name for p in copy.rglob("*"))
    with pytest.raises(SiamkitError, match=r"on 1 process\(es\) where the run had 2.* and its number of processes$"):
        train(TrainConfig(**dict(RUN, steps=6, out=str(copy))), resume=True, progress=False)
    assert sorted(p.name for p in copy.rglob("*")) == before
