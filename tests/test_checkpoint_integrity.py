"""checkpoint.py's promises about the files themselves: a damaged checkpoint is refused before use, a model with
non-finite weights is never loaded, and a disk that fills up during a save is one line with the old file intact.

Issue 28 items 3, 4 and 8; each case first failed on main 935a11e (a damaged last.pt answered 0.9997 SAME; a NaN
model scored "nan"; a full disk ended in PyTorch's inline_container.cc traceback).
"""
from __future__ import annotations

import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from siamkit import fileio
from siamkit.checkpoint import load_checkpoint, save_checkpoint
from siamkit.errors import SiamkitError
from siamkit.fileio import WriteError
from test_cli_bad_input import assert_one_error, run_main
from tiny_run import DiskFillsUp, load_raw, one_torch_thread, tiny_args, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread) -> Path:
    from siamkit.train.loop import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config(out, steps=2), progress=False)
    return out


def data_offset(path: Path, member_suffix: str = "") -> tuple[int, int]:
    """(offset, size) of the bytes of the largest stored member of a zip file (a tensor's data, in a checkpoint)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes(path: Path, offset: int, n: int = 64) -> None:
    with open(path, "rb+") as f:
        f.seek(offset)
        block = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_flipped_bytes_in_last_pt_are_refused_by_verify_in_one_line(run, tmp_path, att_faces, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last.pt"
    offset, size = data_offset(last)
    flip_bytes(last, offset + size // 2)  # inside the largest weight tensor: torch.load alone reads it happily
    image_a, image_b = att_faces / "s1" / "1.pgm", att_faces / "s2" / "1.pgm"
    code, err = run_main(["verify", copy, image_a, image_b, "--threshold", "0.5"], capfd)
    assert_one_error(code, err, f"{last} is damaged: its part ")
    assert err[-1].endswith("fails the zip's checksum or header check (a disk or copy error changed it); use another checkpoint, e.g. "
                            "checkpoints/step-N.pt, or retrain")


def test_a_damaged_zip_directory_is_one_line_too(run, tmp_path):
    path = tmp_path / "last.pt"
    shutil.copy(run / "checkpoints" / "last.pt", path)
    with zipfile.ZipFile(path) as z:
        first, directory = z.infolist()[0], z.start_dir
    flip_bytes(path, first.header_offset, 4)  # a part's own header: the zip's index still points there
    with pytest.raises(SiamkitError, match=rf"^{path} is damaged: its part '{first.filename}' fails the zip's "
                                           r"checksum or header check"):
        load_checkpoint(path)
    shutil.copy(run / "checkpoints" / "last.pt", path)
    flip_bytes(path, directory, 4)  # the index itself (its end record, which finds it, intact)
    with pytest.raises(SiamkitError, match=rf"^{path} is damaged \(its zip structure is broken\)"):
        load_checkpoint(path)


def test_a_model_with_non_finite_weights_is_refused(run, tmp_path, att_faces, capfd):
    state = load_raw(run / "checkpoints" / "last.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    image = att_faces / "s1" / "1.pgm"
    for args in (["verify", bad, image, image, "--threshold", "0.5"],
                 ["embed", bad, "--data", "digits", "--out", tmp_path / "e.npz", "--device", "cpu"],
                 ["enroll", bad, "--data", att_faces, "--out", tmp_path / "gallery"]):
        code, err = run_main(args, capfd)
        assert_one_error(code, err, f"{bad} holds weights that are not finite (NaN or infinity in 1 tensor(s), e.g. "
                                    f"{name}): it cannot embed anything")
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "gallery").exists()


def fill_disk_after(monkeypatch, room: int, when=lambda: True) -> None:
    """From when ``when()`` holds, every file atomic_write opens has ``room`` bytes of disk left."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return DiskFillsUp(f, room) if "w" in mode and when() else f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)


def test_a_disk_that_fills_up_during_a_save_is_a_write_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})
    before = path.read_bytes()
    fill_disk_after(monkeypatch, room=5000)  # a few of torch's records fit, then the disk is full
    with pytest.raises(WriteError, match=rf"^could not write {path}: the disk holding {tmp_path} is full; the previous "
                                         rf"checkpoint there is intact"):
        save_checkpoint(path, {"step": 2, "w": torch.arange(100_000.0)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_a_disk_that_fills_up_while_training_checkpoints_is_one_line(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    kept: dict[str, bytes] = {}

    def full_from_step_4() -> bool:
        if not kept and (ckpts / "last.pt").exists() and load_raw(ckpts / "last.pt")["step"] == 2:
            kept["last.pt"] = (ckpts / "last.pt").read_bytes()
        return bool(kept)

    fill_disk_after(monkeypatch, room=100_000, when=full_from_step_4)
    code, err = run_main(tiny_args(out, steps=4, checkpoint_every=2), capfd)
    monkeypatch.undo()
    assert_one_error(code, err, f"could not write {ckpts / 'last.pt'}: the disk holding {ckpts} is full; the previous "
                                f"checkpoint there is intact (continue with --resume)")
    assert (ckpts / "last.pt").read_bytes() == kept["last.pt"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]
