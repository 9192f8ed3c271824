"""dlib's face chip: cut by dlib's get_face_chip from siamkit's landmarks, RGB from grey, the template checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from siamkit.errors import SiamkitError
from siamkit.faces import use
from siamkit.faces.chips import dlib_alignment, dlib_chip, is_dlib_chip
from siamkit.faces.folder import AlignOptions, align_folder

from _face_photos import att_face

dlib = pytest.importorskip("dlib")


def test_chip_is_dlibs_own_cut_of_the_landmarks(att_faces):
    from siamkit.faces.detect import detect_faces

    photo = att_face(att_faces, 31)  # grey, 92x112
    face = detect_faces(photo)[0]
    chip = dlib_chip(photo, face)
    assert chip.size == (150, 150) and chip.mode == "RGB"
    arr = np.asarray(chip)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # a grey photo: equal channels
    # dlib's sampling with the same whole-pixel landmarks, called here directly on the photo made RGB by numpy
    rgb = np.repeat(np.asarray(photo)[..., None], 3, axis=2)
    points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
    box = dlib.rectangle(*(int(round(v)) for v in face.box))
    expected = dlib.get_face_chip(rgb, dlib.full_object_detection(box, points), size=150, padding=0.25)
    np.testing.assert_array_equal(arr, expected)


def test_align_template_dlib_writes_chips_and_records_the_template(att_faces, tmp_path):
    src = tmp_path / "src" / "s31"
    src.mkdir(parents=True)
    att_face(att_faces, 31).save(src / "1.png")
    summary = align_folder(tmp_path / "src", tmp_path / "dst", AlignOptions.for_template("dlib"), workers=1,
                           progress=False)
    assert summary.count("aligned") == 1
    report = json.loads((tmp_path / "dst" / "align_report.json").read_text())
    assert report["alignment"] == dlib_alignment() and is_dlib_chip(report["alignment"])
    with Image.open(tmp_path / "dst" / "s31" / "1.png") as chip:
        assert chip.size == (150, 150) and chip.mode == "RGB"


def test_dlib_template_takes_no_size_or_margin():
    with pytest.raises(SiamkitError, match="drop --size and --margin"):
        AlignOptions.for_template("dlib", size=112).check()
    with pytest.raises(SiamkitError, match="--template"):
        AlignOptions(template="arcface").check()
    assert AlignOptions.for_template("siamkit") == AlignOptions()


def test_templates_meeting_models(tmp_path, caplog):
    folder112, chips = tmp_path / "a112", tmp_path / "chips"
    for folder, alignment in ((folder112, AlignOptions().alignment()), (chips, dlib_alignment())):
        folder.mkdir()
        (folder / "align_report.json").write_text(json.dumps({"alignment": alignment}))
    with pytest.raises(SiamkitError, match="112 px template"):
        use.check_chip_templates(dlib_alignment(), folder112)  # the dlib model refuses 112 px crops
    use.check_chip_templates(dlib_alignment(), chips)  # its own chips: fine
    use._warned.discard("dlib chips")
    use.check_chip_templates(AlignOptions().alignment(), chips)  # a 112 px model meets dlib chips: a warning
    assert "dlib's 150 px face chips" in caplog.text
    use.check_chip_templates(None, chips)  # an unaligned model: the existing mismatch warning covers it
