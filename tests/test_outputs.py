"""Ownership of outputs (outputs.py): --force replaces only what siamkit made; no command writes over an existing
file unless told, nor over one of its own inputs or into a run's checkpoints/ folder, even when told.

Each case of issue 28 item 1, run through ``siamkit.cli.main`` in this process; each first failed on main 935a11e
(the folder or file was deleted or replaced with exit code 0).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import tree_snapshot
from siamkit.outputs import RUN_MARKER, check_replace_run, foreign_entries, is_run_folder
from siamkit.errors import SiamkitError
from test_cli_bad_input import assert_one_error, run_main
from tiny_run import one_torch_thread, tiny_args, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread) -> Path:
    """A finished tiny run (2 steps)."""
    from siamkit.train.loop import train

    out = tmp_path_factory.mktemp("outputs") / "run"
    train(tiny_config(out, steps=2), progress=False)
    return out


@pytest.fixture
def faces(att_faces, tmp_path) -> Path:
    """Two people of two images each, copied (a write through a symlink would reach the shared data)."""
    root = tmp_path / "faces"
    for person in ("s1", "s2"):
        (root / person).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(att_faces / person / f"{i}.pgm", root / person / f"{i}.pgm")
    return root


def photos(folder: Path) -> Path:
    """A folder of the user's own files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not siamkit's")
    (folder / "notes.txt").write_text("keep me")
    return folder


# --- train --force ------------------------------------------------------------------------------------------------

def test_force_never_removes_the_working_directory(tmp_path, monkeypatch, capfd):
    here = photos(tmp_path / "work")
    monkeypatch.chdir(here)
    before = tree_snapshot(here)
    for flag in ("--force", "--overwrite"):  # --overwrite is the same flag
        code, err = run_main([*tiny_args(Path("."), steps=1), flag], capfd)
        assert_one_error(code, err, "--force would remove ., which is or holds the working directory; pass another "
                                    "--out")
    assert tree_snapshot(here) == before


def test_force_never_removes_a_folder_siamkit_did_not_make(tmp_path, capfd):
    mine = photos(tmp_path / "myphotos")
    before = tree_snapshot(mine)
    code, err = run_main([*tiny_args(mine, steps=1), "--force"], capfd)
    assert_one_error(code, err, f"--force replaces only a run folder that siamkit made, and {mine} is not one (no "
                                f"{RUN_MARKER} marker, no config.json of siamkit); pass another --out")
    assert tree_snapshot(mine) == before


def test_force_never_removes_the_data_or_a_folder_holding_it(faces, tmp_path, capfd):
    before = tree_snapshot(faces)
    for out in (faces, faces.parent):
        code, err = run_main([*tiny_args(out, data=str(faces), steps=1), "--force"], capfd)
        assert_one_error(code, err, f"--force would remove {out}, which is or holds the input {faces}")
    # Nor a run folder created inside the data, where it would become an identity of it.
    code, err = run_main(tiny_args(faces / "run", data=str(faces), steps=1), capfd)
    assert_one_error(code, err, f"--out {faces / 'run'} lies inside {faces}, an input of this command")
    assert tree_snapshot(faces) == before


def test_force_never_removes_a_file(tmp_path, capfd):
    precious = tmp_path / "precious.pgm"
    precious.write_bytes(b"P5 a photo")
    code, err = run_main([*tiny_args(precious, steps=1), "--force"], capfd)
    assert_one_error(code, err, f"--force replaces only a run folder that siamkit made, and {precious} is a file")
    assert precious.read_bytes() == b"P5 a photo"


def test_force_never_removes_the_config_file_it_starts_from(run, tmp_path, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = tree_snapshot(copy)
    code, err = run_main(["train", "--config", str(copy / "config.json"), "--out", str(copy), "--force",
                          "--no-progress", "--steps", "1"], capfd)
    assert_one_error(code, err, f"--force would remove {copy}, which is or holds the input {copy / 'config.json'}")
    assert tree_snapshot(copy) == before


def test_force_replaces_a_run_that_siamkit_made(run, tmp_path, capfd):
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(run, new)
    shutil.copytree(run, old)
    (old / RUN_MARKER).unlink()  # a run from before the marker: its config.json says siamkit wrote it
    for out in (new, old):
        (out / "checkpoints" / "stale.pt").write_bytes(b"an old checkpoint")
        code, err = run_main([*tiny_args(out, steps=1), "--force"], capfd)
        assert code == 0, err
        assert not (out / "checkpoints" / "stale.pt").exists() and (out / RUN_MARKER).is_file()


def test_force_refuses_a_run_holding_anything_else(run, tmp_path, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model.onnx").write_bytes(b"an export the user keeps here")
    (copy / "checkpoints" / "notes.txt").write_text("mine")
    before = tree_snapshot(copy)
    code, err = run_main([*tiny_args(copy, steps=1), "--force"], capfd)
    assert_one_error(code, err, f"--force would remove {copy}, which holds files that siamkit did not write "
                                f"(checkpoints/notes.txt, model.onnx); move them out or pass another --out")
    assert tree_snapshot(copy) == before


def test_what_counts_as_a_run_folder(run, tmp_path):
    assert is_run_folder(run) and foreign_entries(run) == []
    app = tmp_path / "app"
    app.mkdir()
    (app / "config.json").write_text('{"port": 80}')  # a config.json, but not siamkit's
    assert not is_run_folder(app)
    with pytest.raises(SiamkitError, match="is not one"):
        check_replace_run(app, [])
    check_replace_run(tmp_path / "missing", [])  # nothing there: nothing to refuse
    (tmp_path / "empty").mkdir()
    check_replace_run(tmp_path / "empty", [])  # an empty folder: nothing to remove


# --- files written by the other commands --------------------------------------------------------------------------

def test_export_never_writes_into_a_runs_checkpoints(run, tmp_path, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = tree_snapshot(copy)
    for out, flags in ((copy / "checkpoints" / "last.pt", ["--force"]), (copy / "checkpoints" / "new.pt", [])):
        code, err = run_main(["export", copy, "--format", "torchscript", "--out", out, "--data", "digits", *flags],
                             capfd)
        assert_one_error(code, err, f"--out {out} lies in {copy / 'checkpoints'}, a run's checkpoints folder")
    assert tree_snapshot(copy) == before


def test_no_folder_output_lands_in_a_runs_checkpoints(run, faces, tmp_path, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = tree_snapshot(copy)
    ckpts = copy / "checkpoints"
    for args in (["align", faces, ckpts, "--force", "--workers", "1", "--no-progress"],
                 ["evaluate", copy, "--data", "digits", "--device", "cpu", "--out", ckpts, "--force"],
                 ["enroll", copy, "--data", faces, "--out", ckpts, "--force", "--no-progress"]):
        code, err = run_main(args, capfd)
        assert_one_error(code, err, f"lies in {ckpts}, a run's checkpoints folder")
    assert tree_snapshot(copy) == before


@pytest.mark.parametrize("fmt, name, expected", [
    ("torchscript", "m.onnx", "a torchscript export's file name ends in .pt or .ts or .torchscript"),
    ("onnx", "m.pt", "an onnx export's file name ends in .onnx"),
])
def test_an_exports_format_must_match_its_name(run, tmp_path, capfd, fmt, name, expected):
    code, err = run_main(["export", run, "--format", fmt, "--out", tmp_path / name, "--data", "digits"], capfd)
    assert_one_error(code, err, expected)
    assert not (tmp_path / name).exists()


def test_embed_replaces_an_existing_file_only_with_force(run, faces, tmp_path, capfd):
    gallery = tmp_path / "gallery.npz"
    gallery.write_bytes(b"someone's gallery")
    args = ["embed", run, "--data", faces, "--out", gallery, "--device", "cpu"]
    assert_one_error(*run_main(args, capfd), f"--out {gallery} exists; pass --force to replace it, or another --out")
    assert gallery.read_bytes() == b"someone's gallery"
    code, err = run_main([*args, "--force"], capfd)
    assert code == 0, err
    assert gallery.read_bytes()[:2] == b"PK"  # now siamkit's .npz
    # Never onto its own input, even with --force: an .npz inside the data folder.
    inside = faces / "s1" / "e.npz"
    code, err = run_main(["embed", run, "--data", faces, "--out", inside, "--device", "cpu", "--force"], capfd)
    assert_one_error(code, err, f"--out {inside} lies inside {faces}, an input of this command")


def test_verify_never_writes_over_its_pairs_or_images(run, faces, tmp_path, capfd):
    pairs = faces / "pairs.csv"
    pairs.write_text("s1/1.pgm,s2/1.pgm\n")
    before = tree_snapshot(faces)
    for out in (pairs, faces / "s1" / "1.pgm"):
        code, err = run_main(["verify", run, "--pairs", pairs, "--out", out, "--threshold", "0.5", "--force"], capfd)
        assert_one_error(code, err, f"--out {out} ")
        assert "an input of this command" in err[-1]
    # The images of a pairs file outside their folder are inputs too.
    elsewhere = tmp_path / "pairs.csv"
    elsewhere.write_text(f"{faces / 's1' / '1.pgm'},{faces / 's2' / '1.pgm'}\n")
    out = faces / "s2" / "1.pgm"
    code, err = run_main(["verify", run, "--pairs", elsewhere, "--out", out, "--threshold", "0.5", "--force"], capfd)
    assert_one_error(code, err, f"--out {out} is {out}, an input of this command")
    assert tree_snapshot(faces) == before


def test_evaluate_replaces_reports_elsewhere_only_with_force(run, tmp_path, capfd, monkeypatch):
    from siamkit.eval import report as report_module

    # The report's plots are not under test (and a 2-step model's nearly equal scores break its histogram).
    monkeypatch.setattr(report_module, "write_report", lambda *a, **k: None)
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "report.json").write_text('{"mine": true}')
    args = ["evaluate", run, "--data", "digits", "--device", "cpu", "--out", folder]
    assert_one_error(*run_main(args, capfd), f"--out {folder / 'report.json'} exists; pass --force to replace it")
    assert run_main([*args, "--force"], capfd)[0] == 0
    # The run's own eval/ (the default) is replaced as before, without --force.
    assert run_main(["evaluate", run, "--data", "digits", "--device", "cpu"], capfd)[0] == 0


def test_enroll_replaces_a_gallery_only_with_force(run, faces, tmp_path, capfd):
    out = tmp_path / "gallery"
    args = ["enroll", run, "--data", faces, "--out", out, "--no-progress"]
    assert run_main(args, capfd)[0] == 0
    before = (out / "gallery.npz").read_bytes()
    assert_one_error(*run_main(args, capfd), "gallery.npz exists; pass --add to add people to it, --force to "
                                             "replace it, or another --out")
    assert (out / "gallery.npz").read_bytes() == before
    assert run_main([*args, "--force"], capfd)[0] == 0
    code, err = run_main(["enroll", run, "--data", faces, "--out", faces, "--no-progress", "--force"], capfd)
    assert_one_error(code, err, f"lies inside {faces}, an input of this command")
