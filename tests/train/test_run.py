"""Training from the decoded cache: streamed batches give the losses of training from memory, step for step,
also across --resume; --data-in-memory says what it chose."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siamkit import cli
from siamkit.data.cache import ImageRows
from siamkit.data.sources import IdentityDataset
from siamkit.errors import SiamkitError
from siamkit.train import run as run_module
from tiny_run import load_raw, metrics_rows, one_torch_thread  # noqa: F401

STEPS = 6


def _args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    # The faces recipe (a folder's default) on rof_neutral; a constant schedule so that a shorter first run
    # followed by --resume --steps 6 draws and updates exactly as one run of 6 steps. 10 held-out identities:
    # their report is compared too, and scoring every genuine pair of 20% of the people would take most of the time.
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(steps), "--schedule", "constant",
            "--log-every", "1", "--device", "cpu", "--no-progress", "--val-identities", "10", *extra]


@pytest.fixture(scope="module")
def from_memory(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("memory") / "run"
    assert cli.main(_args(data_root / "rof_neutral", out, STEPS, "--cache-dir", "none")) == 0
    return out


def test_streaming_from_the_cache_gives_the_losses_of_training_from_memory_across_resume(
    data_root, from_memory, tmp_path, capfd
):
    out = tmp_path / "run"
    capfd.readouterr()
    assert cli.main(_args(data_root / "rof_neutral", out, 3, "--data-in-memory", "no")) == 0
    err = capfd.readouterr().err
    assert "decoded 6101 images into the cache" in err and "streamed from the decoded cache (--data-in-memory no)" in err
    assert cli.main(_args(data_root / "rof_neutral", out, STEPS, "--data-in-memory", "no", "--resume")) == 0
    assert "decoded 6101 images" not in capfd.readouterr().err  # the second start memory-maps the cache
    ref, got = metrics_rows(from_memory), metrics_rows(out)
    assert [r["step"] for r in got] == [str(s) for s in range(1, STEPS + 1)]
    for a, b in zip(ref, got):
        assert (a["loss"], a["metric"], a["classification"]) == (b["loss"], b["metric"], b["classification"])
    model_ref, model_got = load_raw(from_memory / "checkpoints" / "last.pt")["model"], load_raw(out / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(model_ref[k], model_got[k]) for k in model_ref)
    # The held-out report, embedded batch by batch from the cache, is the one embedded from memory.
    report_ref = json.loads((from_memory / "eval" / "report.json").read_text())
    report_got = json.loads((out / "eval" / "report.json").read_text())
    assert report_got == report_ref


def _dataset(images) -> IdentityDataset:
    return IdentityDataset(images=images, labels=np.zeros(len(images), np.int64), names=["a"], paths=["p"] * len(images))


def test_data_in_memory_auto_decides_from_free_memory_and_says_so(monkeypatch, capfd):
    rows = ImageRows(np.zeros((1000, 3, 32, 32), np.uint8))  # 3 MiB of images
    cpu = torch.device("cpu")
    monkeypatch.setattr(run_module, "free_memory", lambda device: 8 * 2**20)  # 8 MiB free: under half
    assert run_module.keep_in_memory("auto", _dataset(rows), cpu) is True
    assert "kept on cpu (--data-in-memory auto: under half of the 0.0 GiB free)" in capfd.readouterr().err
    monkeypatch.setattr(run_module, "free_memory", lambda device: 5 * 2**20)  # 5 MiB free: over half
    assert run_module.keep_in_memory("auto", _dataset(rows), cpu) is False
    assert "streamed from the decoded cache (--data-in-memory auto: over half" in capfd.readouterr().err
    assert run_module.keep_in_memory("yes", _dataset(rows), cpu) is True  # fits, if not in half
    monkeypatch.setattr(run_module, "free_memory", lambda device: 2**20)
    with pytest.raises(SiamkitError, match="--data-in-memory yes: 0.00 GiB of training images do not fit.*"
                                           "pass --data-in-memory no"):
        run_module.keep_in_memory("yes", _dataset(rows), cpu)
    # Images decoded into memory already (a built-in source, --cache-dir none) stay there, with a word for "no".
    assert run_module.keep_in_memory("no", _dataset(torch.zeros(10, 1, 8, 8, dtype=torch.uint8)), cpu) is True
    assert "built-in data set or not cached" in capfd.readouterr().err


def test_free_memory_reads_the_host_memory():
    free = run_module.free_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < free <= total


def test_face_augment_settings_are_the_ones_each_batch_is_drawn_with(att_faces, tmp_path):
    """--face-augment reaches the training batches: with every draw off the batch is --augment none's, and a mirror
    drawn for every image mirrors it, at every step."""
    from siamkit.config import TrainConfig
    from siamkit.train.distributed import DistContext
    from siamkit.train.run import build_run

    def first_batches(name: str, **options) -> list[torch.Tensor]:
        cfg = TrainConfig(data=str(att_faces), image_size=[32, 32], identities_per_batch=4, images_per_identity=2,
                          mining="batch-hard", steps=2, val_identities=0, device="cpu", out=str(tmp_path / name),
                          backbone="resnet18-small-w16-flat", **options)
        cfg.validate()
        run = build_run(cfg, DistContext(), resume=False, overwrite=False)
        return [run.batch(step)[0] for step in (0, 1)]

    still = "scale=1:1,rotation=0,shift=0,brightness_contrast=0,erase=0"
    plain = first_batches("none", augment="none")
    unchanged = first_batches("off", augment="face", face_augment=still + ",flip=0")
    assert all(torch.equal(a, b) for a, b in zip(plain, unchanged))
    mirrored = first_batches("mirror", augment="face", face_augment=still + ",flip=1")
    assert all(torch.equal(a.flip(-1), b) for a, b in zip(plain, mirrored))
    assert not torch.equal(plain[0], first_batches("default", augment="face")[0])
