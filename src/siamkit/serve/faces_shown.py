"""The faces a verify request was decided on, as PNG images: what the page at / shows beside the score.

``POST /v1/verify?return_faces=true`` adds ``faces``: two base64 PNGs of the model's input for image1 and image2
(Verifier.pixels: decoded, the face cut and aligned when the server aligns, at the model's input size). They are
the very pixels that were embedded, so a wrong crop is seen, not guessed at.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ..errors import SiamkitError

YES, NO = ("true", "1", "yes"), ("false", "0", "no", "")


def wants_faces(text: str | None) -> bool:
    """The return_faces field: true/1/yes or false/0/no (absent: false); anything else is one clear error."""
    value = (text or "").strip().lower()
    if value not in YES + NO:
        raise SiamkitError(f"return_faces must be true or false, got {str(text)[:40]!r}")
    return value in YES


def png_base64(pixels: np.ndarray) -> str:
    """Base64 PNG of uint8 pixels [C, H, W] (one channel: grey; three: RGB)."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
