"""Every bad input of the command line: one clear 'siamkit: error:' line, exit code 2, no traceback, nothing
half-written and nothing of an earlier run changed.

Most cases call ``siamkit.cli.main`` in this process (the code ``python -m siamkit`` runs, without a
seconds-long interpreter start each time); a few run ``python -m siamkit`` to check the process itself.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tree_snapshot
from siamkit import cli, fileio
from siamkit.train import logging as metrics_logging
from siamkit.checkpoint import FORMAT
from tiny_run import ONE_THREAD_ENV, DiskFillsUp, load_raw, metrics_rows, one_torch_thread, tiny_args, tiny_config  # noqa: F401


def run_main(args: list[str], capfd) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of ``siamkit ARGS`` run in this process."""
    capfd.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capfd.readouterr().err.splitlines()


def assert_one_error(code: int, err: list[str], expected: str) -> str:
    """Exit 2, and the last stderr line is the one error line, containing ``expected``."""
    assert code == 2, err
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert err[-1].startswith("siamkit: error: ") and expected in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    return err[-1]


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


class RunsCode:
    """A pickle that calls builtins.exec when loaded: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, one_torch_thread) -> Path:
    """A finished run (2 steps): what a user does not want to lose."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    from siamkit.train.loop import train

    train(tiny_config(run, steps=2), progress=False)
    return run


@pytest.fixture(scope="module")
def lfw_style(att_faces, tmp_path_factory) -> Path:
    """AT&T images under LFW names (Name/Name_0001.pgm), as symlinks, for pairs files."""
    root = tmp_path_factory.mktemp("lfw_style")
    for name, ident in (("Alice", "s1"), ("Bob", "s2"), ("Carol", "s3")):
        (root / name).mkdir()
        for i in range(1, 5):
            (root / name / f"{name}_{i:04d}.pgm").symlink_to(att_faces / ident / f"{i}.pgm")
    return root


# --- options out of range ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, expected",
    [
        (["--margin", "-0.5"], "--margin must be positive, got -0.5"),
        (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
        (["--image-size", "0", "0"], "--image-size takes H W, each at least 8 pixels, got [0, 0]"),
        (["--steps", "-3"], "--steps must be 0 or more, got -3"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many' (see siamkit train --help)"),
        (["--val-identities", "9"], "--val-identities 9 holds out 9 of 10 identities"),
        # digits: 8 training identities (1435 images) after holding out 2 (362 images).
        (["--identities-per-batch", "9", "--images-per-identity", "2", "--mining", "batch-hard"],
         "--identities-per-batch 9 x 1 process(es) is more than the 8 training identities with 2+ images"),
        (["--identities-per-batch", "8", "--images-per-identity", "200", "--mining", "batch-hard"],
         "a PK batch of P=8 x K=200 images is larger than the 1435 training images; pass a smaller P or K"),
        (["--batch-size", "2000"], "--batch-size 2000 x 1 process(es) is larger than the 1435 usable anchor images"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies to a compiled step: add --compile"),
        (["--classifier", "softmax", "--subcenters", "3"],
         "--subcenters 3 applies to --classifier arcface or cosface, not softmax"),
        (["--subcenters", "0"], "--subcenters must be a positive number, got 0"),
        (["--augment", "face", "--face-augment", "erase=2"], "--face-augment: erase takes a value in [0, 1], got 2.0"),
        (["--face-augment", "erase=0"],  # digits train without augmentation
         "--face-augment applies to --augment face, and this run's augmentation is none; add --augment face or drop"),
    ],
)
def test_options_out_of_range(tmp_path, capfd, options, expected):
    out = tmp_path / "run"
    code, err = run_main([*tiny_args(out, steps=1, val_identities=0.2), *options], capfd)
    assert_one_error(code, err, expected)
    assert not out.exists()


# --- training data ------------------------------------------------------------------------------------------------

def _bad_images_only(root: Path) -> None:
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "report.png").write_bytes(b"%PDF-1.7 a document with an image extension")
    (root / "b" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="JPEG")
    (root / "b" / "cut.jpg").write_bytes(buf.getvalue()[:120])


def _single_images(root: Path, att_faces: Path) -> None:
    for ident in ("s1", "s2", "s3"):
        (root / ident).mkdir(parents=True)
        (root / ident / "1.pgm").symlink_to(att_faces / ident / "1.pgm")


def _symlink_loops(root: Path) -> None:
    root.mkdir()
    (root / "me").symlink_to("me")
    (root / "ping").symlink_to("pong")
    (root / "pong").symlink_to("ping")


@pytest.mark.parametrize(
    "make, expected, warning",
    [
        (lambda root, att: None, "does not exist; pass a folder with one sub-folder per identity", None),
        (lambda root, att: (root.mkdir(), (root / "alice").mkdir()), "has no identity sub-folders with images", None),
        (lambda root, att: _bad_images_only(root), "no readable images in", "skipped 4 unreadable image(s)"),
        (lambda root, att: _single_images(root, att), "every identity in training data has a single image", None),
        (lambda root, att: _symlink_loops(root), "has no identity sub-folders with images", "Too many levels of symbolic links"),
    ],
    ids=["missing", "no-images", "unreadable-images", "one-image-each", "symlink-loops"],
)
def test_unusable_training_data(tmp_path, att_faces, capfd, make, expected, warning):
    data, out = tmp_path / "data", tmp_path / "run"
    make(data, att_faces)
    code, err = run_main(tiny_args(out, data=data, steps=1), capfd)
    assert_one_error(code, err, expected)
    if warning:
        assert any(line.startswith("siamkit: warning: ") and warning in line for line in err), err
    assert not out.exists()


# --- the run folder -----------------------------------------------------------------------------------------------

def test_existing_run_is_refused_and_kept(earlier_run, capfd):
    before = tree_snapshot(earlier_run)
    code, err = run_main(tiny_args(earlier_run, steps=2), capfd)
    assert_one_error(code, err, f"run folder {earlier_run} already exists; pass --resume to continue it, "
                                f"--force to replace it, or another --out")
    code, err = run_main([*tiny_args(earlier_run, steps=2), "--resume", "--overwrite"], capfd)
    assert_one_error(code, err, "--resume continues a run and --force replaces it: pass only one of them")
    assert tree_snapshot(earlier_run) == before


def test_resume_with_other_data_is_refused(earlier_run, att_faces, tmp_path, capfd):
    data = tmp_path / "att"
    data.mkdir()
    for i in range(1, 11):
        (data / f"s{i}").symlink_to(att_faces / f"s{i}")
    before = tree_snapshot(earlier_run)
    code, err = run_main([*tiny_args(earlier_run, data=data, steps=4), "--resume"], capfd)
    assert_one_error(code, err, f"--resume: the training data differs from the run in {earlier_run}")
    assert tree_snapshot(earlier_run) == before


def test_resume_with_other_preprocessing_is_refused(earlier_run, capfd):
    # Other pixels from one step to the next would make the run neither the old one nor a new one.
    before = tree_snapshot(earlier_run)
    code, err = run_main([*tiny_args(earlier_run, steps=4, image_size=[24, 24]), "--resume"], capfd)
    assert_one_error(code, err, f"--resume: the run in {earlier_run} saw its images preprocessed as")
    assert "pass the run's --image-size, --center-crop, --grayscale and --photo-box" in err[-1]
    assert tree_snapshot(earlier_run) == before


def test_resume_without_a_checkpoint(tmp_path, capfd):
    (tmp_path / "run").mkdir()
    code, err = run_main([*tiny_args(tmp_path / "run", steps=2), "--resume"], capfd)
    assert_one_error(code, err, f"--resume: {tmp_path / 'run'}/checkpoints/last.pt does not exist")


def test_run_folder_under_a_regular_file(tmp_path, capfd):
    # Tests run as root, for whom permission bits stop nothing: a path below a regular file cannot be created.
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    code, err = run_main(tiny_args(blocker / "run", steps=1), capfd)
    assert_one_error(code, err, f"cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_run_folder_where_nothing_can_be_written(capfd):
    # /proc accepts no new files, not even from root; os.access would still say "writable".
    code, err = run_main(tiny_args(Path("/proc/siamkit-run"), steps=1), capfd)
    assert_one_error(code, err, "cannot write the run folder /proc/siamkit-run: /proc is not writable (")
    assert err[-1].endswith("); pass another --out")


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    real_fdopen = os.fdopen
    kept: dict[str, bytes] = {}

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if (ckpts / "last.pt").exists() and not kept:
            kept["last.pt"] = (ckpts / "last.pt").read_bytes()  # the step-2 checkpoint: the disk is full from now
        return DiskFillsUp(f, room=0) if kept and "w" in mode else f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    code, err = run_main(tiny_args(out, steps=4, checkpoint_every=2), capfd)
    monkeypatch.undo()
    assert_one_error(
        code, err,
        f"could not write {ckpts / 'last.pt'}: the disk holding {ckpts} is full; the previous checkpoint there is "
        f"intact (continue with --resume); free some space there and run the command again",
    )
    assert (ckpts / "last.pt").read_bytes() == kept["last.pt"]
    assert load_raw(ckpts / "last.pt")["step"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]  # no half-written temporary file


def test_disk_full_while_logging_keeps_the_rows(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    real_open = builtins.open
    rows_seen = []

    def open_(file, mode="r", *args, **kwargs):
        if Path(file).name == "metrics.csv" and "a" in mode:
            rows_seen.append(1)
            if len(rows_seen) >= 2:  # the second row finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_logging, "open", open_, raising=False)
    code, err = run_main(tiny_args(out, steps=4), capfd)
    monkeypatch.undo()
    assert_one_error(
        code, err,
        f"could not write {out / 'metrics.csv'}: the disk holding {out} is full; rows written before are intact "
        f"(continue with --resume)",
    )
    assert [r["step"] for r in metrics_rows(out)] == ["1"]
    assert load_raw(out / "checkpoints" / "last.pt")["step"] == 1


# --- checkpoints and model files ----------------------------------------------------------------------------------

def test_a_checkpoint_that_runs_code_is_refused_by_every_command(earlier_run, tmp_path, att_faces, capfd):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "model": RunsCode(marker)}, evil)
    refused = f"refused to load {evil}: unpickling it would call exec, which is not tensor or plain data"
    image = att_faces / "s1" / "1.pgm"
    for args in (
        ["evaluate", evil, "--data", "digits", "--device", "cpu"],
        ["verify", evil, image, image],
        ["embed", evil, "--data", "digits", "--out", tmp_path / "e.npz"],
    ):
        assert_one_error(*run_main(args, capfd), refused)
    # The backbone weights of --pretrained go through the same safe loader.
    code, err = run_main(tiny_args(tmp_path / "run", steps=1, pretrained=str(evil)), capfd)
    assert_one_error(code, err, f"--pretrained {evil} is not a readable PyTorch state dict")
    # A tampered last.pt of a run: --resume refuses it and changes nothing.
    run = tmp_path / "copied_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())
    before = tree_snapshot(run)
    code, err = run_main([*tiny_args(run, steps=4), "--resume"], capfd)
    assert_one_error(code, err, f"refused to load {run / 'checkpoints' / 'last.pt'}")
    assert tree_snapshot(run) == before
    assert not marker.exists() and not (tmp_path / "e.npz").exists() and not (tmp_path / "run").exists()


def test_a_checkpoint_that_runs_code_in_a_real_process(tmp_path, att_faces):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "model": RunsCode(marker)}, evil)
    image = att_faces / "s1" / "1.pgm"
    result = run_cli("verify", str(evil), str(image), str(image), env=ONE_THREAD_ENV)
    assert result.returncode == 2
    assert result.stderr.startswith(f"siamkit: error: refused to load {evil}: unpickling it would call exec")
    assert result.stderr.count("\n") == 1 and not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "foreign", "future"])
def test_unusable_checkpoints(earlier_run, tmp_path, att_faces, capfd, kind):
    path = tmp_path / "model.pt"
    if kind == "truncated":
        data = (earlier_run / "checkpoints" / "last.pt").read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        expected = f"{path} is not a readable checkpoint (truncated, damaged or not a PyTorch file"
    elif kind == "foreign":
        torch.save(torch.nn.Conv2d(1, 1, 3).state_dict(), path)
        expected = f"{path} is a PyTorch file but not a siamkit checkpoint"
    else:
        state = load_raw(earlier_run / "checkpoints" / "last.pt")
        torch.save({**state, "format": "siamkit-checkpoint-v2", "siamkit_version": "0.5.0"}, path)
        expected = f"{path} is a siamkit checkpoint in format 'siamkit-checkpoint-v2' (written by siamkit 0.5.0)"
    image = att_faces / "s1" / "1.pgm"
    assert_one_error(*run_main(["verify", path, image, image, "--threshold", "0.5"], capfd), expected)
    assert_one_error(*run_main(["evaluate", path, "--data", "digits", "--device", "cpu"], capfd), expected)


# --- images given to a trained model ---------------------------------------------------------------------------

def test_bad_images_at_verify(earlier_run, tmp_path, att_faces, capfd):
    good = att_faces / "s1" / "1.pgm"
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (tmp_path / "doc.jpg").write_text("not an image")
    for bad, reason in (("empty.jpg", "cannot identify image file"), ("bomb.png", "too large"),
                        ("doc.jpg", "cannot identify image file"), ("missing.jpg", "No such file or directory")):
        code, err = run_main(["verify", earlier_run, tmp_path / bad, good, "--threshold", "0.5"], capfd)
        assert_one_error(code, err, f"cannot read image {tmp_path / bad}: ")
        assert reason in err[-1]


def test_embed_skips_bad_images_with_one_warning(earlier_run, tmp_path, att_faces, capfd):
    import warnings

    data = tmp_path / "data"
    for ident in ("s1", "s2"):
        (data / ident).mkdir(parents=True)
        for i in (1, 2):
            (data / ident / f"{i}.pgm").symlink_to(att_faces / ident / f"{i}.pgm")
    (data / "s1" / "zero.pgm").write_bytes(b"")
    (data / "s2" / "huge.png").write_bytes(png_header(10_000, 10_000))  # makes Pillow warn on its own
    out = tmp_path / "emb.npz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # anything not silenced by the command line would be caught here
        code, err = run_main(["embed", earlier_run, "--data", data, "--out", out, "--device", "cpu"], capfd)
    assert code == 0, err
    # Only siamkit's own line: no Python warning text from Pillow.
    assert [w for w in caught if "PIL" in w.filename] == []
    # Besides the decoded cache's progress bar and summary line, only that one warning.
    assert [line for line in err if line.startswith("siamkit:") and "decoded 4 images into the cache" not in line] == [
        f"siamkit: warning: skipped 2 unreadable image(s): {data / 's1' / 'zero.pgm'} (cannot identify image file "
        f"{str(data / 's1' / 'zero.pgm')!r}); {data / 's2' / 'huge.png'} (10000x10000 pixels is too large "
        f"(limit 40,000,000))"
    ]
    assert all(line.startswith(("siamkit:", "decode:")) or not line.strip() for line in err), err
    saved = np.load(out)
    assert saved["paths"].tolist() == ["s1/1.pgm", "s1/2.pgm", "s2/1.pgm", "s2/2.pgm"]


def test_embed_to_a_folder_that_is_a_file(earlier_run, tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_main(["embed", earlier_run, "--data", "digits", "--out", blocker / "e.npz", "--device", "cpu"], capfd)
    assert_one_error(code, err, f"could not write {blocker / 'e.npz'}: {blocker} is a file, not a folder; pick another path")
    assert blocker.read_text() == "x"


# --- pairs files ---------------------------------------------------------------------------------------------------

# Two sets (folds) of one matched and one mismatched pair: the smallest file k-fold accuracy accepts.
GOOD_PAIRS = "2\t1\nAlice\t1\t2\nAlice\t1\tBob\t2\nBob\t1\t3\nCarol\t4\tAlice\t3\n"


def test_good_pairs_file_evaluates(earlier_run, lfw_style, tmp_path, capfd, monkeypatch):
    """The positive control for the cases below: the same command with a correct file works."""
    from siamkit.eval import report as report_module

    # Plots are not under test here, and eval/report.py's score histogram fails on the nearly constant scores
    # of a 2-step model (np.histogram_bin_edges: "Too many bins for data range"): keep the report only.
    written = []
    monkeypatch.setattr(report_module, "write_report", lambda report, scores, same, out, *baseline: written.append(report))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(GOOD_PAIRS)
    code, err = run_main(["evaluate", earlier_run, "--data", lfw_style, "--pairs", pairs, "--device", "cpu",
                          "--out", tmp_path / "eval"], capfd)
    assert code == 0, err
    assert (written[0]["n_pairs"], written[0]["n_genuine"], written[0]["n_impostor"]) == (4, 2, 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pairs\tfile\nAlice\t1\t2\n", "bad header on line 1 'pairs file'; the first line must be 'SETS<TAB>N'"),
        ("2\t3\n" + GOOD_PAIRS.split("\n", 1)[1], "the header says 2 set(s) of 3 matched + 3 mismatched pairs = 12 "
                                                  "pair lines, but the file has 4"),
        (GOOD_PAIRS.replace("Bob\t1\t3", "Bob\t0\t3"), "line 4: image number '0' is not an integer >= 1"),
        (GOOD_PAIRS.replace("Bob\t1\t3", "Bob\tone\t3"), "line 4: image number 'one' is not an integer >= 1"),
        (GOOD_PAIRS.replace("Bob\t1\t3", "Bob\t1\t9"), "line 4: image Bob/Bob_0009.<ext> not found"),
        (GOOD_PAIRS.replace("Carol\t4", "Zed\t1"), "line 5: image Zed/Zed_0001.<ext> not found"),
        (GOOD_PAIRS.replace("Alice\t1\t2\n", "Alice\t1\n"), "line 2: a matched pair needs 3 fields 'name i j', got 2"),
        ("", "is empty; pass an LFW pairs.txt"),
    ],
    ids=["header", "count", "index-0", "index-word", "index-missing", "name-missing", "fields", "empty"],
)
def test_bad_pairs_files(earlier_run, lfw_style, tmp_path, capfd, text, expected):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text)
    before = tree_snapshot(earlier_run)
    code, err = run_main(["evaluate", earlier_run, "--data", lfw_style, "--pairs", pairs, "--device", "cpu"], capfd)
    assert_one_error(code, err, f"pairs file {pairs}")
    assert expected in err[-1], err[-1]
    assert tree_snapshot(earlier_run) == before  # no eval/ folder, nothing half-written


def test_missing_pairs_file(earlier_run, lfw_style, tmp_path, capfd):
    code, err = run_main(["evaluate", earlier_run, "--data", lfw_style, "--pairs", tmp_path / "nope.txt",
                          "--device", "cpu"], capfd)
    assert_one_error(code, err, f"pairs file {tmp_path / 'nope.txt'} does not exist")


def test_pairs_naming_an_unreadable_image(earlier_run, lfw_style, tmp_path, capfd):
    data = tmp_path / "data"
    for name in ("Alice", "Bob", "Carol"):
        (data / name).mkdir(parents=True)
        for i in range(1, 5):
            (data / name / f"{name}_{i:04d}.pgm").symlink_to(lfw_style / name / f"{name}_{i:04d}.pgm")
    (data / "Bob" / "Bob_0003.pgm").unlink()
    (data / "Bob" / "Bob_0003.pgm").write_bytes(b"")  # listed, but not an image
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(GOOD_PAIRS)
    code, err = run_main(["evaluate", earlier_run, "--data", data, "--pairs", pairs, "--device", "cpu",
                          "--out", tmp_path / "eval"], capfd)
    assert_one_error(code, err, f"1 image(s) named in {pairs} could not be read from {data}, e.g. Bob/Bob_0003.pgm")
    assert any("skipped 1 unreadable image(s)" in line for line in err)
    assert not (tmp_path / "eval").exists()


# --- the decoded cache's options ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--cache-dir", "{blocker}/cache"], "could not write {blocker}/cache/index.json: {blocker} is a file, not a folder"),
    (["--data-in-memory", "maybe"], "argument --data-in-memory: invalid choice: 'maybe'"),
    (["--cache-max-gb", "0"], "--cache-max-gb must be a positive number, got 0.0"),
])
def test_bad_cache_options_are_one_line_and_write_nothing(att_faces, tmp_path, capfd, args, expected):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = tmp_path / "run"
    args = [a.format(blocker=blocker) for a in args]
    code, err = run_main(["train", "--data", att_faces, "--out", out, "--steps", "1", *args], capfd)
    assert_one_error(code, err, expected.format(blocker=blocker))
    assert not out.exists()
