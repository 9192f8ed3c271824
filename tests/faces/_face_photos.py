"""Test photos made from the real faces in ../shared/data (helpers, and the `photos` fixture to import)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def att_face(att_faces: Path, person: int, shot: int = 1) -> Image.Image:
    return Image.open(att_faces / f"s{person}" / f"{shot}.pgm").convert("L")


def texture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB texture: a background with structure but no face."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture
def photos(att_faces, data_root, tmp_path) -> Path:
    """SRC with: a greyscale AT&T face, an RGB rof face, two faces in one photo, no face, a tiny and a corrupt file."""
    src = tmp_path / "src"
    (src / "alice").mkdir(parents=True)
    (src / "bob").mkdir()
    att_face(att_faces, 1).save(src / "alice" / "grey.pgm")
    rof = sorted((data_root / "rof_neutral" / "al_pacino").glob("*.jpg"))[0]
    Image.open(rof).save(src / "alice" / "rgb.jpg")
    two = texture(420, 260, seed=1)
    two.paste(att_face(att_faces, 2).convert("RGB"), (150, 80))  # centre (196, 136): near the middle
    big = att_face(att_faces, 3).convert("RGB").resize((138, 168))
    two.paste(big, (270, 40))  # centre (339, 124): larger, off-centre
    two.save(src / "bob" / "two.png")
    texture(200, 200, seed=2).save(src / "bob" / "noface.png")
    texture(10, 12, seed=3).save(src / "bob" / "tiny.png")
    (src / "bob" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a whole JPEG")
    return src
