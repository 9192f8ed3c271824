"""Uploaded bytes -> a PIL image, refusing what is not a picture or would not fit: the server's one door for pixels.

The type is found by decoding (Pillow's common decoders only, data/pixels.py PILLOW_FORMATS), never from a name or
a content type. The pixel count is read from the header and checked before any pixel is decoded, so a small file
that claims 20000x20000 pixels (a decompression bomb) costs nothing. Bytes stay in memory: nothing uploaded is
written to disk.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

from ..data.pixels import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, PILLOW_FORMATS, upright


class BadImage(ValueError):
    """An upload that is not a usable image (answered with HTTP 4xx naming the field)."""


def decode_upload(data: bytes, field: str, max_pixels: int = MAX_IMAGE_PIXELS, for_align: bool = False) -> Image.Image:
    """The image in ``data`` as `siamkit verify` reads a file: EXIF orientation applied; for ``for_align`` converted as
    `siamkit align` opens a photo (L or RGB). BadImage with a one-line reason otherwise."""
    if not data:
        raise BadImage(f"{field} is empty; send an image file (JPEG, PNG, PGM, BMP, TIFF, WebP or GIF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{field} is {w}x{h} pixels, more than the limit of {max_pixels:,}; send a smaller "
                               f"image")
            if min(w, h) < MIN_IMAGE_SIDE:
                raise BadImage(f"{field} is {w}x{h} pixels, too small to tell anyone apart ({MIN_IMAGE_SIDE} pixels "
                               f"a side at least)")
            img.load()
            img = upright(img)
            if for_align:
                img = img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
            return img
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{field} claims too many pixels (a decompression bomb?); send a smaller image") from None
    except MemoryError:
        raise BadImage(f"{field} is too large to decode in memory; send a smaller image") from None
    except Exception as e:  # Pillow raises many types on broken or crafted files (OSError, SyntaxError, struct.error)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        if reason.startswith("cannot identify image file"):  # Pillow names its BytesIO object: no help to a client
            reason = "no known image format"
        raise BadImage(f"{field} is not a readable image ({reason}); send a JPEG, PNG, PGM, BMP, TIFF, WebP or GIF "
                       f"file") from None
