"""Alignment at use time: --align / align=True, the checkpoint's alignment, the mismatch warning, the missing extra."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import siamkit
from siamkit.errors import SiamkitError
from siamkit.faces import detect, use
from siamkit.faces.folder import AlignOptions, align_folder

from tiny_run import load_raw, one_torch_thread, tiny_config  # noqa: F401 (fixture)
from _face_photos import att_face, texture


@pytest.fixture
def no_extra(monkeypatch):
    """As if the align extra were not installed: `import dlib` fails."""
    monkeypatch.setitem(sys.modules, "dlib", None)
    detect._models.cache_clear()
    yield
    detect._models.cache_clear()


def test_missing_extra_is_one_line(no_extra, tmp_path):
    with pytest.raises(SiamkitError, match=r'pip install "siamkit\[align\]"'):
        detect.check_installed()
    (tmp_path / "src").mkdir()
    Image.new("L", (50, 50)).save(tmp_path / "src" / "a.png")
    with pytest.raises(SiamkitError, match=r'pip install "siamkit\[align\]"'):
        align_folder(tmp_path / "src", tmp_path / "dst", workers=1)
    assert not (tmp_path / "dst").exists()  # refused before writing anything


def test_cli_align_without_extra_says_what_to_install(tmp_path, cli):
    (tmp_path / "src").mkdir()
    Image.new("L", (50, 50)).save(tmp_path / "src" / "a.png")
    # A sitecustomize-free way to hide dlib from the child: a module named dlib that raises ImportError.
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "dlib.py").write_text("raise ImportError('hidden for the test')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = cli("align", str(tmp_path / "src"), str(tmp_path / "dst"), env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        'siamkit: error: face alignment needs the align extra: pip install "siamkit[align]" (dlib-bin and face-recognition-models)']
    assert not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def aligned_run(att_faces, tmp_path_factory):
    """A tiny model trained on 4 AT&T people aligned by siamkit align (64x64)."""
    from siamkit.train.loop import train

    base = tmp_path_factory.mktemp("aligned_run")
    src = base / "src"
    for person in range(1, 5):
        (src / f"s{person}").mkdir(parents=True)
        for shot in range(1, 6):
            att_face(att_faces, person, shot).save(src / f"s{person}" / f"{shot}.png")
    align_folder(src, base / "aligned", AlignOptions(size=64), workers=1, progress=False)
    torch_threads = one_torch_thread  # noqa: F841
    train(tiny_config(base / "run", data=str(base / "aligned"), steps=2), progress=False)
    return base


def test_train_stores_the_alignment_in_the_checkpoint(aligned_run):
    ckpt = load_raw(aligned_run / "run" / "checkpoints" / "last.pt")
    assert ckpt["alignment"]["size"] == 64 and ckpt["alignment"]["margin"] == 0.0
    assert len(ckpt["alignment"]["template"]) == 5


def test_a_model_of_aligned_tight_crops_fills_beyond_their_photo_box(aligned_run, att_faces, tmp_path):
    # AT&T's 92x112 photos are tight around the face: the aligned crops show their repeated edge pixels near the
    # crop's sides, and the report keeps the median box of the part that showed the photo. The model's
    # preprocessing fills beyond that box, in training and at every use (--photo-box auto).
    from siamkit.config import TrainConfig
    from siamkit.faces.folder import read_alignment
    from siamkit.train.run import preprocess_for

    box = read_alignment(aligned_run / "aligned")["photo_box"]
    assert 0 < box[0] < box[2] < 64  # the photos ended inside the crop, left and right
    pre = load_raw(aligned_run / "run" / "checkpoints" / "last.pt")["preprocess"]
    np.testing.assert_allclose(pre["fill_box"], [v / 64 for v in box], atol=5e-5)  # rounded to 4 decimals
    assert preprocess_for(TrainConfig(data=str(aligned_run / "aligned"), photo_box="off")).fill_box is None
    # So what a wide photo shows beyond the box (background) does not reach the model.
    v = siamkit.load(aligned_run / "run")
    crop = np.asarray(use.align_one(att_face(att_faces, 2, 4).convert("RGB"), v.alignment))
    other = crop.copy()
    left = int(round(box[0]))
    other[:, : left - 1] = texture(64, 64, seed=8).crop((0, 0, left - 1, 64))  # inside the fill, short of its edge
    np.testing.assert_array_equal(v.embed([Image.fromarray(crop)], align=False), v.embed([Image.fromarray(other)], align=False))


def test_an_exported_model_fills_beyond_the_photo_box_too(aligned_run, att_faces, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason='the export tests need the export extra: pip install -e ".[test]"')
    from siamkit.cli import main
    from siamkit.exported import load_exported

    path = tmp_path / "model.onnx"
    assert main(["export", str(aligned_run / "run"), "--out", str(path), "--data", str(aligned_run / "aligned")]) == 0
    exported = load_exported(path)
    pre = load_raw(aligned_run / "run" / "checkpoints" / "last.pt")["preprocess"]
    assert exported.preprocess.fill_box is not None and list(exported.preprocess.fill_box) == pre["fill_box"]
    crop = np.asarray(use.align_one(att_face(att_faces, 3, 2).convert("RGB"), siamkit.load(aligned_run / "run").alignment))
    other = crop.copy()
    left = int(round(pre["fill_box"][0] * 64))
    other[:, : left - 1] = 0  # beyond the box, short of its edge: filled over before the model sees it
    np.testing.assert_array_equal(exported.embed([Image.fromarray(crop)]), exported.embed([Image.fromarray(other)]))


def test_load_align_embeds_the_aligned_face_of_a_photo(aligned_run, att_faces, caplog):
    v = siamkit.load(aligned_run / "run", align=True)
    photo = texture(360, 300, seed=5)
    photo.paste(att_face(att_faces, 1, 3).convert("RGB").rotate(15, expand=False), (140, 90))
    aligned = use.align_one(photo, v.alignment)
    assert aligned.size == (64, 64)
    # align=True on the photo embeds exactly what embedding its aligned crop does.
    np.testing.assert_allclose(v.embed([photo]), v.embed([aligned], align=False), atol=1e-6)
    with pytest.raises(SiamkitError, match="no face found"):
        v.embed([texture(200, 200, seed=6)])


def test_mismatch_warns_once(aligned_run, att_faces, monkeypatch):
    monkeypatch.setattr(use, "_warned", set())
    messages = []
    monkeypatch.setattr(use, "warn", messages.append)
    v = siamkit.load(aligned_run / "run")  # trained aligned, given raw 92x112 faces without align
    v.embed([att_face(att_faces, 1), att_face(att_faces, 2)])
    v.embed([att_face(att_faces, 3)])
    assert len(messages) == 1 and "trained on aligned faces" in messages[0] and "--align" in messages[0]
    v.embed([Image.new("L", (64, 64))])  # the model's crop size: taken as aligned, no warning
    assert len(messages) == 1
    use.warn_mismatch(None, True, "the images")
    assert len(messages) == 2 and "trained on unaligned images" in messages[1]


def test_cli_verify_and_evaluate_with_align(aligned_run, att_faces, tmp_path, cli):
    photos = tmp_path / "photos"
    for person in (1, 2):
        (photos / f"p{person}").mkdir(parents=True)
        for shot in (6, 7, 8):
            photo = texture(300, 260, seed=10 * person + shot)
            photo.paste(att_face(att_faces, person, shot).convert("RGB"), (40 + 20 * shot, 60))
            photo.save(photos / f"p{person}" / f"{shot}.jpg")
    run = str(aligned_run / "run")
    r = cli("verify", run, str(photos / "p1" / "6.jpg"), str(photos / "p1" / "7.jpg"), "--align", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("score ") and "warning" not in r.stderr  # aligned model, aligned inputs
    r = cli("verify", run, str(photos / "p1" / "6.jpg"), str(photos / "p1" / "7.jpg"), "--threshold", "0.5")
    assert "trained on aligned faces" in r.stderr  # the same photos without --align: warned
    r = cli("evaluate", run, "--data", str(photos), "--align", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n_genuine"] == 6  # 3 + 3 genuine pairs: every photo's face was found and aligned
