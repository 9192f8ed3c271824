"""Uploaded bytes -> image: the type found by decoding, the pixel count checked from the header, the pixels the
same as the command line reads from the file."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from siamkit.data.pixels import Preprocess, decode_image_array, image_to_array
from siamkit.serve.images import BadImage, decode_upload
from siamkit.serve.names import check_gallery_name, check_identity_name
from siamkit.errors import SiamkitError
from _serve_helpers import png_header_only


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_pixels_equal_the_command_lines(att_faces, tmp_path):
    pre = Preprocess(image_size=(32, 32), channels=3)
    path = att_faces / "s1" / "1.pgm"
    assert np.array_equal(image_to_array(decode_upload(path.read_bytes(), "image"), pre), decode_image_array(path, pre))


def test_exif_orientation_is_applied_as_for_files(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    data = encoded(img, "PNG", exif=exif)
    (tmp_path / "a.png").write_bytes(data)
    pre = Preprocess(image_size=(24, 24))
    got = decode_upload(data, "image")
    assert got.size == (40, 60)
    assert np.array_equal(image_to_array(got, pre), decode_image_array(tmp_path / "a.png", pre))


def test_the_type_comes_from_the_bytes_not_a_name():
    img = Image.new("L", (30, 30), 7)
    for fmt in ("PNG", "JPEG", "BMP", "PPM", "TIFF"):
        assert decode_upload(encoded(img, fmt), "image").size == (30, 30)
    with pytest.raises(BadImage, match="no known image format"):
        decode_upload(b"%!PS-Adobe-3.0 EPSF\n" + b"x" * 100, "image")  # EPS: never handed to Ghostscript


@pytest.mark.parametrize("data, match", [
    (b"", "is empty"),
    (png_header_only(9000, 9000), "9000x9000 pixels, more than the limit"),
    (png_header_only(100, 100), "not a readable image"),  # a header and no pixels
])
def test_unusable_uploads_are_one_line(data, match):
    with pytest.raises(BadImage, match=match):
        decode_upload(data, "image")


def test_the_pixel_limit_is_the_servers_option():
    data = png_header_only(300, 300)
    with pytest.raises(BadImage, match="300x300 pixels, more than the limit of 50,000"):
        decode_upload(data, "image", max_pixels=50_000)


def test_too_small_an_image_is_refused():
    with pytest.raises(BadImage, match="too small"):
        decode_upload(encoded(Image.new("L", (8, 8)), "PNG"), "image")


@pytest.mark.parametrize("name", ["alice", "Jean-Luc Picard", "李小龙", "o'brien", "x" * 128])
def test_good_identity_names(name):
    assert check_identity_name(name) == name


@pytest.mark.parametrize("name", ["", " ", "a/b", "..", "a\\b", "tab\there", "nul\x00", "x" * 129, " pad",
                                  "rtl\u202eoverride"])
def test_bad_identity_names(name):
    with pytest.raises(SiamkitError, match="identity name"):
        check_identity_name(name)


@pytest.mark.parametrize("name, ok", [("people", True), ("g-1.v2_b", True), (".hidden", False), ("a b", False),
                                      ("a/b", False), ("", False), ("x" * 65, False)])
def test_gallery_names(name, ok):
    if ok:
        assert check_gallery_name(name) == name
    else:
        with pytest.raises(SiamkitError, match="gallery name"):
            check_gallery_name(name)
