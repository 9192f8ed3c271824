"""Pack the AT&T faces (../shared/data/att_faces) into src/siamkit/data/att_faces.png, the built-in face data.

One lossless greyscale PNG, a grid of 40 rows (identities s1..s40) x 10 columns (images 1..10), each cell
112x92 pixels as in the original PGMs: 2.7 MB instead of 4.1 MB, and decoded by Pillow's PNG decoder,
which siamkit already trusts. tests/data/test_builtin_sources.py checks it pixel for pixel.

    python scripts/pack_att_faces.py [--src ../shared/data/att_faces]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IDENTITIES, PER_IDENTITY, H, W = 40, 10, 112, 92


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "att_faces"))
    p.add_argument("--out", default=str(REPO / "src" / "siamkit" / "data" / "att_faces.png"))
    args = p.parse_args()
    grid = np.zeros((IDENTITIES * H, PER_IDENTITY * W), dtype=np.uint8)
    for i in range(IDENTITIES):
        for k in range(PER_IDENTITY):
            img = np.asarray(Image.open(Path(args.src) / f"s{i + 1}" / f"{k + 1}.pgm"))
            assert img.shape == (H, W) and img.dtype == np.uint8
            grid[i * H : (i + 1) * H, k * W : (k + 1) * W] = img
    Image.fromarray(grid).save(args.out, format="PNG", optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
