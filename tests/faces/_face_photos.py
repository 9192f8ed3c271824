"""Helpers that make test photos from the real faces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def att_face(att_faces: Path, person: int, shot: int = 1) -> Image.Image:
    return Image.open(att_faces / f"s{person}" / f"{shot}.pgm").convert("L")


def texture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB texture: a background with structure but no face."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
