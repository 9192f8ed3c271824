"""The canonical 5-point template of siamkit.faces.align (TEMPLATE_112): how it was made.

Detects faces and dlib's 5 landmarks on every image of the given folders, takes the mean shape by
generalised Procrustes analysis (each face's points similarity-aligned to the running mean, 10 rounds), and
places it in a 112x112 crop with the similarity that puts the centres of the two eyes on the ArcFace
112x112 template's eye centres. Prints the template as a Python array.

    python experiments/align_template.py /work/shared/data/rof_neutral /work/shared/data/att_faces
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from siamkit.faces.align import apply, estimate_similarity  # noqa: E402
from siamkit.faces.detect import detect_faces  # noqa: E402

ARCFACE_EYES = np.array([[73.5318, 51.5014], [38.2946, 51.6963]])  # image-right eye centre, image-left eye centre


def landmarks(path: str):
    faces = detect_faces(Image.open(path))
    return max(faces, key=lambda f: f.area).landmarks if faces else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    args = ap.parse_args()
    files = sorted(str(p) for f in args.folders for p in Path(f).rglob("*") if p.suffix.lower() in (".jpg", ".pgm", ".png"))
    with Pool(2) as pool:
        shapes = [s for s in pool.imap(landmarks, files, chunksize=16) if s is not None]
    print(f"{len(shapes)} faces with landmarks of {len(files)} images")
    mean = shapes[0] - shapes[0].mean(axis=0)
    for _ in range(10):
        aligned = np.stack([apply(estimate_similarity(s, mean), s) for s in shapes])
        new = aligned.mean(axis=0)
        new = (new - new.mean(axis=0)) / np.sqrt(((new - new.mean(axis=0)) ** 2).sum())  # fix the scale
        mean = new
    eyes = np.stack([mean[0:2].mean(axis=0), mean[2:4].mean(axis=0)])
    placed = apply(estimate_similarity(eyes, ARCFACE_EYES), mean)
    print("TEMPLATE_112 = np.array([\n" + "".join(f"    [{x:.2f}, {y:.2f}],\n" for x, y in placed) + "])")


if __name__ == "__main__":
    main()
