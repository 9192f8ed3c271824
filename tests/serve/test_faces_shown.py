"""serve/faces_shown.py: the model inputs verify returns as PNGs for the page, and the return_faces field."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from siamkit.errors import SiamkitError
from siamkit.serve.faces_shown import png_base64, wants_faces


def decoded(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.format == "PNG"
        return np.asarray(im)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_holds_the_model_input_pixel_for_pixel(channels):
    pixels = np.random.default_rng(channels).integers(0, 256, (channels, 7, 5), dtype=np.uint8)
    shown = decoded(png_base64(pixels))
    # PNG is lossless: the very bytes, as H x W (grey) or H x W x 3 (RGB)
    expected = pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)
    np.testing.assert_array_equal(shown, expected)


@pytest.mark.parametrize("text, wanted", [(None, False), ("", False), ("false", False), ("0", False),
                                          ("no", False), ("true", True), ("1", True), ("YES", True), (" True ", True)])
def test_return_faces_reads_yes_and_no(text, wanted):
    assert wants_faces(text) is wanted


def test_return_faces_refuses_anything_else_in_one_line():
    with pytest.raises(SiamkitError, match="return_faces must be true or false, got 'maybe'"):
        wants_faces("maybe")
