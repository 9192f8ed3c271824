"""`siamkit align` on a folder: every kind of photo listed with its reason, nothing half-written, resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from _face_photos import photos  # noqa: F401 (fixture)
from siamkit.errors import SiamkitError
from siamkit.faces import folder
from siamkit.faces.align import template
from siamkit.faces.detect import detect_faces
from siamkit.faces.folder import JOURNAL, REPORT, AlignOptions, align_folder, read_alignment


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_align_folder_lists_every_outcome(photos, tmp_path):
    dst = tmp_path / "dst"
    summary = align_folder(photos, dst, AlignOptions(size=96), workers=1, progress=False)
    report = json.loads((dst / REPORT).read_text())
    assert report["counts"] == {"images": 6, "aligned": 3, "aligned_without_detection": 0, "no_face": 2, "unreadable": 1}
    assert summary.count("aligned") == 3
    reasons = {d["path"]: d["reason"] for d in report["no_face"] + report["unreadable"]}
    assert "too small" in reasons["bob/tiny.png"] and "10x12" in reasons["bob/tiny.png"]
    assert "no face detected" in reasons["bob/noface.png"]
    assert "not a readable image" in reasons["bob/corrupt.jpg"]
    assert report["several_faces"] == ["bob/two.png"]
    # Only the aligned crops are written (same relative paths), with no temporary file left behind.
    assert files_under(dst) == sorted(["alice/grey.pgm", "alice/rgb.jpg", "bob/two.png", JOURNAL, REPORT])
    grey = Image.open(dst / "alice" / "grey.pgm")
    assert grey.size == (96, 96) and grey.mode == "L"  # a greyscale photo stays greyscale
    assert Image.open(dst / "alice" / "rgb.jpg").mode == "RGB"
    # The report says how the faces were aligned; train reads it from there.
    alignment = read_alignment(dst)
    assert alignment["size"] == 96 and alignment["margin"] == 0.0
    np.testing.assert_allclose(alignment["template"], template(96), atol=1e-4)
    # ... and where, in a typical crop, the photo itself ended: each side's median over the detected faces' boxes.
    boxes = [json.loads(line)["box"] for line in (dst / JOURNAL).read_text().splitlines()[1:]
             if json.loads(line)["status"] == "aligned"]
    assert len(boxes) == 3 and alignment["photo_box"] == folder.median_box(boxes)


def test_median_box_by_hand():
    boxes = [[0.0, 5.0, 90.0, 112.0], [10.0, 1.0, 100.0, 112.0], None, [20.0, 3.0, 80.0, 100.0]]
    assert folder.median_box(boxes) == [10.0, 3.0, 90.0, 112.0]
    assert folder.median_box([None]) is None


def test_two_faces_largest_or_central(photos):
    image = Image.open(photos / "bob" / "two.png")
    faces = detect_faces(image)
    assert len(faces) == 2
    from siamkit.faces.align import pick_face

    largest, central = pick_face(faces, image.size, "largest"), pick_face(faces, image.size, "center")
    assert largest.center[0] > 270 and largest.area > 1.5 * min(f.area for f in faces)  # the 1.5x-pasted face
    assert 150 < central.center[0] < 242  # the small face, nearer the middle (x=210)


def test_undetected_frame_is_counted_apart(photos, tmp_path):
    dst = tmp_path / "dst"
    align_folder(photos, dst, AlignOptions(undetected="frame"), workers=1, progress=False)
    report = json.loads((dst / REPORT).read_text())
    assert report["counts"]["aligned"] == 3  # never counted as found
    assert [d["path"] for d in report["aligned_without_detection"]] == ["bob/noface.png"]
    assert (dst / "bob" / "noface.png").is_file()


def test_interrupted_align_resumes_without_redoing(photos, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    real = folder._align_one
    calls = []

    def interrupted(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(folder, "_align_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        align_folder(photos, dst, workers=1, progress=False)
    assert not (dst / REPORT).exists()
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(folder, "_align_one", lambda job: (calls.append(job[0]), real(job))[1])
    summary = align_folder(photos, dst, workers=1, progress=False)
    assert sorted(calls) == sorted(set(folder.list_images(photos)) - set(first))  # finished files are not redone
    assert summary.redone == 3
    report = json.loads((dst / REPORT).read_text())
    assert report["counts"]["images"] == 6 and report["counts"]["aligned"] == 3
    # A third run has nothing left to do.
    calls.clear()
    align_folder(photos, dst, workers=1, progress=False)
    assert calls == []


def test_resume_with_other_options_is_refused(photos, tmp_path):
    dst = tmp_path / "dst"
    align_folder(photos, dst, AlignOptions(size=64), workers=1, progress=False)
    with pytest.raises(SiamkitError, match="other options"):
        align_folder(photos, dst, AlignOptions(size=112), workers=1, progress=False)


def test_bad_folders_and_options(tmp_path):
    with pytest.raises(SiamkitError, match="not a folder"):
        align_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiamkitError, match="no images"):
        align_folder(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SiamkitError, match="--pick"):
        align_folder(tmp_path / "empty", tmp_path / "out", AlignOptions(pick="left"))
    assert not (tmp_path / "out").exists()  # nothing written for a refused command


def test_cli_align_on_worker_processes(photos, tmp_path, cli):
    dst = tmp_path / "dst"
    r = cli("align", str(photos), str(dst), "--size", "80", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    # One summary line: found, without detection, skipped and unreadable, and where the reasons are.
    assert r.stderr.strip().splitlines() == [
        f"siamkit: aligned 3 of 6 images with a detected face, 0 aligned without a detection, 2 skipped (no face), "
        f"1 unreadable (6 processed now) -> {dst} (reasons: {dst / REPORT})"]
    assert Image.open(dst / "bob" / "two.png").size == (80, 80)
    r = cli("align", str(photos), str(dst), "--size", "80", "--workers", "2", "--no-progress")
    assert "(0 processed now)" in r.stderr  # a rerun finds everything done


def test_a_photo_stored_sideways_with_an_exif_tag_aligns_like_the_upright_one(data_root, tmp_path):
    # Phones store a photo turned, with an orientation tag; siamkit aligned the stored pixels (issue 28).
    face = Image.open(sorted((data_root / "rof_neutral" / "al_pacino").glob("*.jpg"))[0]).convert("RGB")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    face.save(src / "a" / "upright.png")  # PNG on both sides: lossless, so the crops must be equal pixel for pixel
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": the pixels are stored turned counter-clockwise
    face.transpose(Image.Transpose.ROTATE_90).save(src / "a" / "phone.png", exif=exif)
    dst = tmp_path / "dst"
    summary = align_folder(src, dst, AlignOptions(size=96), workers=1, progress=False)
    assert {r.path: r.status for r in summary.results} == {"a/upright.png": "aligned", "a/phone.png": "aligned"}
    np.testing.assert_array_equal(np.asarray(Image.open(dst / "a" / "phone.png")),
                                  np.asarray(Image.open(dst / "a" / "upright.png")))


def test_align_size_has_an_upper_bound(tmp_path):
    MAX_IMAGE_SIDE = 1024  # the bound documented in data/limits.py and docs/reliability-inputs.md
    AlignOptions(size=MAX_IMAGE_SIDE).check()
    with pytest.raises(SiamkitError, match=f"--size takes sides of 8 to {MAX_IMAGE_SIDE} pixels, got 100000"):
        align_folder(tmp_path, tmp_path / "out", AlignOptions(size=100_000), workers=1, progress=False)
    assert not (tmp_path / "out").exists()  # refused before DST, its journal or a crop exists


def test_a_journal_from_before_templates_resumes(photos, tmp_path):
    """A DST whose journal predates --template (no "template" in its options) finishes as siamkit's template."""
    from siamkit.faces.folder import JOURNAL

    dst = tmp_path / "dst"
    dst.mkdir()
    old = {k: v for k, v in vars(AlignOptions()).items() if k != "template"}
    (dst / JOURNAL).write_text(json.dumps({"options": old}) + "\n")
    summary = align_folder(photos, dst, AlignOptions(), workers=1, progress=False)
    assert summary.count("aligned") >= 1
