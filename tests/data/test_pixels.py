"""data/pixels.py's fill beyond a box: by hand on small arrays, and inside the model's preprocessing."""
from __future__ import annotations

import numpy as np
from PIL import Image

from siamkit.data.pixels import Preprocess, fill_beyond, image_to_array


def test_fill_beyond_repeats_the_box_edge():
    rng = np.random.default_rng(3)
    for channels in ((), (3,)):
        arr = rng.integers(0, 256, (7, 9) + channels, dtype=np.uint8)
        img = Image.fromarray(arr)
        out = np.asarray(fill_beyond(img, [2.0, 1.0, 6.0, 5.0]))
        # independent path: every pixel takes the value of the nearest pixel of columns 2..5, rows 1..4
        ys, xs = np.mgrid[0:7, 0:9]
        np.testing.assert_array_equal(out, arr[np.clip(ys, 1, 4), np.clip(xs, 2, 5)])
        assert fill_beyond(img, None) is img
        np.testing.assert_array_equal(np.asarray(fill_beyond(img, [0.0, 0.0, 9.0, 7.0])), arr)


def test_preprocess_fills_beyond_its_box_before_resizing():
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
    pre = Preprocess(image_size=(8, 4), fill_box=(0.25, 0.1, 0.75, 1.0))
    # the box in this 20x40 image's pixels: columns 5..14, rows 4..39
    ys, xs = np.mgrid[0:40, 0:20]
    filled = Image.fromarray(arr[np.clip(ys, 4, 39), np.clip(xs, 5, 14)])
    expected = np.asarray(filled.resize((4, 8), Image.BILINEAR, reducing_gap=None)).transpose(2, 0, 1)
    np.testing.assert_array_equal(image_to_array(Image.fromarray(arr), pre), expected)
    # what lies beyond the box no longer matters
    other = arr.copy()
    other[:, :5] = 0
    other[:3] = 255
    np.testing.assert_array_equal(image_to_array(Image.fromarray(other), pre), expected)


def test_preprocess_dict_round_trip_and_old_dicts():
    pre = Preprocess(image_size=(32, 32), fill_box=(0.1, 0.0, 0.9, 1.0))
    d = pre.to_dict()
    assert d["fill_box"] == [0.1, 0.0, 0.9, 1.0] and Preprocess.from_dict(d) == pre
    plain = Preprocess(image_size=(32, 32))
    # without a box the dict is the one siamkit wrote before the field existed (decoded caches keep their keys)
    assert "fill_box" not in plain.to_dict() and Preprocess.from_dict(plain.to_dict()) == plain


# --- EXIF orientation (issue 28: phone photos were read sideways) -------------------------------------------------

# EXIF orientation -> what a camera did to the upright photo before storing it (the tag asks to undo it).
STORED_AS = {
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


def save_tagged(upright: Image.Image, orientation: int, path) -> None:
    """``upright`` stored as a camera stores it: pixels turned, an EXIF tag saying how to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    STORED_AS[orientation](upright).save(path, exif=exif)


def test_every_exif_orientation_decodes_to_the_upright_pixels(data_root, tmp_path):
    from siamkit.data.pixels import decode_image_array

    face = Image.open(sorted((data_root / "rof_neutral" / "al_pacino").glob("*.jpg"))[0]).convert("RGB")
    face.save(tmp_path / "upright.png")  # PNG: lossless, so the pixels can be compared exactly
    pre = Preprocess(image_size=(40, 30))  # not square: a sideways decode cannot even have the right aspect
    expected = decode_image_array(tmp_path / "upright.png", pre)
    for orientation in STORED_AS:
        save_tagged(face, orientation, tmp_path / f"o{orientation}.png")
        stored = np.asarray(Image.open(tmp_path / f"o{orientation}.png"))
        assert stored.shape != np.asarray(face).shape or not np.array_equal(stored, np.asarray(face))  # really turned
        np.testing.assert_array_equal(decode_image_array(tmp_path / f"o{orientation}.png", pre), expected,
                                      err_msg=f"orientation {orientation}")


def test_images_smaller_than_a_model_can_use_are_named(tmp_path):
    from siamkit.data.pixels import MIN_IMAGE_SIDE, decode_image_array, too_small

    pre = Preprocess(image_size=(32, 32))
    for w, h in ((1, 1), (MIN_IMAGE_SIDE - 1, 200), (200, MIN_IMAGE_SIDE - 1)):
        assert too_small((w, h)) == (f"{w}x{h} pixels is too small to tell anyone apart (at least {MIN_IMAGE_SIDE} "
                                     f"px a side, as siamkit align requires)")
    assert too_small((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)) is None
    # the size the decoder reports is the upright one: a 20x10 photo stored as 10x20 with its EXIF tag
    save_tagged(Image.new("L", (20, 10), 128), 6, tmp_path / "turned.png")
    sizes = []
    assert decode_image_array(tmp_path / "turned.png", pre, sizes).shape == (3, 32, 32) and sizes == [(20, 10)]
