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
