"""Issue 28, part B: inputs a careless user gives every command, each answered right or refused in one line.

Photos stored sideways with an EXIF tag, file names that are not UTF-8, sizes beyond what fits, thresholds a score
cannot reach, options that contradict each other, images too small to use, exported models where a run is
needed, a gallery whose model changed, a run folder without a checkpoint. Each case failed on main 935a11e.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import siamkit
from conftest import REPO, tree_snapshot
from siamkit import cli
from siamkit.outputs import write_run_marker
from siamkit.train.loop import train
from tiny_run import ONE_THREAD_ENV, one_torch_thread, tiny_args, tiny_config  # noqa: F401 (fixture)


def run_main(args: list, capfd) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of ``siamkit ARGS`` run in this process."""
    capfd.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.err.splitlines(), captured.out


def assert_one_error(code: int, err: list[str], expected: str) -> None:
    assert code == 2, err
    assert [line for line in err if "error" in line.lower()] == [err[-1]], err
    assert err[-1].startswith("siamkit: error: ") and expected in err[-1], err[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread) -> Path:
    """A finished tiny run (2 steps on digits, RGB 32x32): enough to embed, score and enroll. resnet18: after two
    steps its embeddings still tell images apart (mobilenet_v3_small's all point one way then: every score 1.0)."""
    out = tmp_path_factory.mktemp("inputs") / "run"
    train(tiny_config(out, steps=2, backbone="resnet18"), progress=False)
    return out


@pytest.fixture(scope="module")
def face(data_root) -> Image.Image:
    return Image.open(sorted((data_root / "rof_neutral" / "al_pacino").glob("*.jpg"))[0]).convert("RGB")


def two_people(att_faces: Path, root: Path, names: tuple = ("alice", "bob")) -> Path:
    """A folder of identity sub-folders (symlinks to AT&T faces), names as given (str or bytes)."""
    for i, name in enumerate(names, start=1):
        folder = os.path.join(bytes(root), name if isinstance(name, bytes) else name.encode())
        os.makedirs(folder)
        for k in (1, 2, 3):
            os.symlink(bytes(att_faces / f"s{i}" / f"{k}.pgm"), os.path.join(folder, f"{k}.pgm".encode()))
    return root


# --- 5. orientation ------------------------------------------------------------------------------------------------

def test_a_photo_stored_sideways_with_its_tag_scores_as_the_upright_one(run, face, tmp_path, capfd):
    face.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned counter-clockwise; the tag says how to turn it back
    face.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    face.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png")  # the same pixels, no tag: a control
    code, err, out = run_main(["verify", run, tmp_path / "upright.png", tmp_path / "phone.png", "--threshold", "0.5"],
                              capfd)
    assert code == 0, err
    assert out.startswith("score 1.0000") and "SAME" in out
    v = siamkit.load(run)
    # Equal pixels give equal embeddings: the cosine is 1 up to float32 rounding of the embedding (a few 1e-7).
    assert v.score(str(tmp_path / "upright.png"), str(tmp_path / "phone.png")) == pytest.approx(1.0, abs=1e-5)
    assert v.score(str(tmp_path / "upright.png"), str(tmp_path / "sideways.png")) < 1.0 - 1e-5  # turning matters


# --- 6. limits -----------------------------------------------------------------------------------------------------

def test_an_image_size_beyond_the_bound_is_refused_before_anything_is_made(tmp_path, capfd):
    out = tmp_path / "run"
    # --data names no folder: the size is refused before the data is even looked at (main 935a11e, without the bound,
    # went on to the data, and on a real data set decoded gigabytes before failing)
    code, err, _ = run_main(tiny_args(out, data=str(tmp_path / "photos"), steps=1, image_size=[2048, 2048],
                                      cache_dir=str(tmp_path / "cache")), capfd)
    assert_one_error(code, err, "--image-size takes sides of 8 to 1024 pixels, got 2048")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_data_that_would_not_fit_in_memory_is_refused_before_decoding(att_split, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("siamkit.data.limits.available_memory", lambda: 2**18)  # 256 KiB available: as if full
    out = tmp_path / "run"
    code, err, _ = run_main(tiny_args(out, data=str(att_split[1]), steps=1, cache_dir="none"), capfd)
    assert_one_error(code, err, "100 images at 3x32x32 decode to 0.0 GiB, more than half of the 0.0 GiB of memory "
                                "available; pass a smaller --image-size")
    assert not out.exists()


# --- 7. every value checked ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gallery(run, att_faces, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    people = two_people(att_faces, root / "people")
    assert cli.main(["enroll", str(run), "--data", str(people), "--out", str(root / "g"), "--no-progress"]) == 0
    return root / "g"


def test_identify_refuses_threshold_beside_far_as_verify_does(run, gallery, att_faces, capfd):
    image = att_faces / "s1" / "9.pgm"
    expected = "--threshold and --far both choose the threshold: pass only one of them"
    assert_one_error(*run_main(["identify", gallery, image, "--threshold", "0.5", "--far", "1e-1"], capfd)[:2], expected)
    assert_one_error(*run_main(["verify", run, image, image, "--threshold", "0.5", "--far", "1e-1"], capfd)[:2], expected)
    code, err, _ = run_main(["identify", gallery, image, "--threshold", "nan"], capfd)
    assert_one_error(code, err, "--threshold nan is not a finite number")


def test_steps_beside_epochs_is_refused_but_a_recipes_epochs_give_way(tmp_path, capfd):
    code, err, _ = run_main([*tiny_args(tmp_path / "run", steps=5), "--epochs", "2"], capfd)
    assert_one_error(code, err, "--steps and --epochs both set the run's length: pass only one of them")
    assert not (tmp_path / "run").exists()
    # the faces recipe sets --epochs 100: --steps given here overrides it, as any flag overrides a recipe
    args = cli.parse_args(["train", "--data", "att", "--recipe", "faces", "--steps", "7"])
    assert (args.steps, args.epochs) == (7, 100)


def test_an_image_too_small_to_use_is_refused_by_verify_and_named_by_embed(run, att_faces, tmp_path, capfd):
    Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
    good = att_faces / "s1" / "1.pgm"
    code, err, _ = run_main(["verify", run, tmp_path / "dot.png", good, "--threshold", "0.5"], capfd)
    assert_one_error(code, err, f"cannot read image {tmp_path / 'dot.png'}: 1x1 pixels is too small to tell anyone "
                                f"apart (at least 16 px a side, as siamkit align requires)")
    data = two_people(att_faces, tmp_path / "data")
    shutil.copy(tmp_path / "dot.png", data / "alice" / "dot.png")
    # a data folder keeps it (training data stays as it was), with one warning naming it, cached or not
    for cache in (str(tmp_path / "cache"), "none"):
        out = tmp_path / f"e-{cache == 'none'}.npz"  # a new file each time: embed never replaces one unasked
        code, err, _ = run_main(["embed", run, "--data", data, "--out", out, "--device", "cpu",
                                 "--cache-dir", cache], capfd)
        assert code == 0, err
        assert f"siamkit: warning: 1 image(s) too small to tell anyone apart, used as they are: {data / 'alice' / 'dot.png'}" \
               f" (1x1 pixels is too small to tell anyone apart (at least 16 px a side, as siamkit align requires)); " \
               f"check them" in err, err
        assert "alice/dot.png" in np.load(out)["paths"].tolist()


# --- 8. any file-name bytes ----------------------------------------------------------------------------------------

def test_folder_names_that_are_not_utf8_train_evaluate_and_print(att_faces, tmp_path, capfd):
    data = two_people(att_faces, tmp_path / "data", (b"\xff\xfe", b"caf\xe9", b"ok"))
    out = tmp_path / "run"
    code, err, _ = run_main(tiny_args(out, data=str(data), steps=1, cache_dir=str(tmp_path / "cache")), capfd)
    assert code == 0, err
    code, err, _ = run_main(["evaluate", out, "--data", data, "--out", tmp_path / "ev", "--device", "cpu",
                             "--cache-dir", tmp_path / "cache"], capfd)
    assert code == 0, err
    assert cli.main(["enroll", str(out), "--data", str(data), "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    # A terminal in a UTF-8 locale: stdout refuses lone surrogates unless told otherwise (PYTHONIOENCODING=utf-8).
    probe = os.path.join(bytes(data), b"\xff\xfe", b"1.pgm")
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "siamkit", "identify", bytes(tmp_path / "g"), probe, "--threshold",
                             "0.5"], capture_output=True, env=env, timeout=600)  # bytes: the output is not UTF-8
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith(probe + b": ")  # the name printed as the bytes it is, as ls prints it


# --- 9. the smaller items ------------------------------------------------------------------------------------------

def test_an_exported_model_where_a_checkpoint_is_needed_is_named(run, att_faces, tmp_path, capfd):
    import onnx
    from onnx import TensorProto, helper

    people = two_people(att_faces, tmp_path / "people")  # 6 images to check the export on: seconds, not minutes
    code, err, _ = run_main(["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--data", people],
                            capfd)
    assert code == 0, err
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")  # any valid ONNX model
    for path, kind in ((tmp_path / "m.pt", "a TorchScript model"), (tmp_path / "m.onnx", "an ONNX model")):
        expected = (f"{path} is {kind} (what siamkit export writes), not a checkpoint: pass the run it was exported "
                    f"from (RUN or RUN/checkpoints/last.pt)")
        assert_one_error(*run_main(["evaluate", path, "--data", "digits", "--device", "cpu"], capfd)[:2], expected)
        assert_one_error(*run_main(["export", path, "--out", tmp_path / "again.onnx"], capfd)[:2], expected)
    assert not (tmp_path / "again.onnx").exists()


def test_a_gallery_whose_model_was_retrained_in_place_says_so(run, att_faces, tmp_path, capfd):
    model = tmp_path / "run"
    shutil.copytree(run, model)
    people = two_people(att_faces, tmp_path / "people")
    assert cli.main(["enroll", str(model), "--data", str(people), "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    train(tiny_config(tmp_path / "other", steps=2, seed=1), progress=False)
    # retrained in place: the same path, other weights
    shutil.copy(tmp_path / "other" / "checkpoints" / "last.pt", model / "checkpoints" / "last.pt")
    code, err, _ = run_main(["identify", tmp_path / "g", att_faces / "s1" / "9.pgm", "--threshold", "0.5"], capfd)
    assert_one_error(code, err, f"the model {model.resolve()} has changed since this gallery was enrolled with it "
                                f"(its weights embed differently now: retrained or replaced); enroll the gallery again")


def test_a_run_folder_without_a_checkpoint_gets_advice_that_leads_somewhere(tmp_path, capfd):
    out = tmp_path / "run"
    out.mkdir()
    write_run_marker(out)  # a run stopped before its first checkpoint: siamkit's marker, nothing else yet
    before = tree_snapshot(out)
    code, err, _ = run_main(tiny_args(out, steps=1), capfd)
    assert_one_error(code, err, f"run folder {out} already exists; it holds no checkpoint to resume "
                                f"(checkpoints/last.pt); pass --force to start it again, or another --out")
    code, err, _ = run_main([*tiny_args(out, steps=1), "--resume"], capfd)
    assert_one_error(code, err, f"--resume: {out}/checkpoints/last.pt does not exist, so there is nothing to resume; "
                                f"pass --force instead to start the run again")
    assert tree_snapshot(out) == before
    code, err, _ = run_main([*tiny_args(out, steps=1), "--force"], capfd)  # the advice, taken, starts the run again
    assert code == 0, err
    assert (out / "checkpoints" / "last.pt").is_file()


def test_options_that_would_be_ignored_are_refused_alike(run, gallery, tmp_path, capfd):
    before = tree_snapshot(gallery)
    code, err, _ = run_main(["enroll", run, "--out", gallery, "--remove", "alice", "--data", tmp_path], capfd)
    assert_one_error(code, err, "--remove and --data/--add change the gallery in opposite ways (run enroll once for "
                                "each): pass only one of them")
    assert tree_snapshot(gallery) == before  # alice is still enrolled
    code, err, _ = run_main(["evaluate", run, "--protocol", "identification", "--gallery", tmp_path, "--probes",
                             tmp_path, "--calibrate", "--out", tmp_path / "ev"], capfd)
    assert_one_error(code, err, "--protocol identification and --calibrate belong to different evaluations "
                                "(--pairs and --calibrate are verification's): pass only one of them")
    assert not (tmp_path / "ev").exists()
