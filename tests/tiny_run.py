"""Tiny training settings shared by the reliability tests: real data and models, a few steps, seconds to run."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from siamkit.config import TrainConfig

# The smallest torchvision backbone siamkit offers; with BatchNorm, Adam and the full checkpoint, like any other.
BACKBONE = "mobilenet_v3_small"
TINY: dict[str, Any] = {
    "data": "digits",
    "image_size": [32, 32],
    "batch_size": 8,
    "backbone": BACKBONE,
    "val_identities": 0,
    "log_every": 1,
    "checkpoint_every": 1,
    "device": "cpu",
    "seed": 0,
}


# One intra-op thread: the same results as two (the tests compare runs made alike), and on a busy shared
# machine two OpenMP threads spin-wait for each other, making a tiny step many times slower.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Import into a test module to train in-process on one thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


def tiny_args(out: Path, **overrides: Any) -> list[str]:
    """The same settings as ``siamkit train`` arguments."""
    args = ["train", "--out", str(out), "--no-progress", "--recipe", "none"]
    for key, value in {**TINY, **overrides}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def load_raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics_rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


class DiskFillsUp:
    """A file on a disk with ``room`` bytes left: writes succeed until it is full, then fail with ENOSPC, as a real
    one does (torch's zip writer turns such a late failure into a RuntimeError about positions)."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self._f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


class Crash(Exception):
    """What crash_after_checkpoint raises: a run dying right after a checkpoint."""


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """Make training raise Crash right after it writes checkpoints/last.pt of ``step`` (undo with monkeypatch.undo())."""
    from siamkit.train import state

    real_save = state.save_checkpoint

    def save_then_crash(path, saved):
        real_save(path, saved)
        if path.name == "last.pt" and saved["step"] == step:
            raise Crash

    monkeypatch.setattr(state, "save_checkpoint", save_then_crash)
