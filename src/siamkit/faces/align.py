"""siamkit's own part of face alignment: the canonical 5-point template, the least-squares similarity
transform onto it, and the warp that cuts the aligned crop.

The template holds dlib's five points (eye corners, base of the nose; faces/detect.py) in a 112x112 crop.
It is the mean shape of the points found on the 6,401 faces detected among the 6,101 rof_neutral and
400 AT&T images (generalised Procrustes analysis, experiments/align_template.py), placed so that the centres
of the eyes fall where the widely used ArcFace 112x112 template puts its eye centres (38.29, 51.70) and
(73.53, 51.50).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..data.limits import check_side
from ..errors import SiamkitError
from .detect import Face

TEMPLATE_SIZE = 112
# dlib's order: image-right eye (outer, inner), image-left eye (outer, inner), base of the nose; x, y in a 112x112 crop.
TEMPLATE_112 = np.array([
    [80.56, 51.21],
    [66.51, 51.79],
    [31.30, 51.48],
    [45.29, 51.91],
    [55.96, 79.26],
])
PICKS = ("largest", "center")


def template(size: int = TEMPLATE_SIZE, margin: float = 0.0) -> np.ndarray:
    """The template's points in a size x size crop; ``margin`` adds that fraction of the face on every side."""
    if size < 8:
        raise SiamkitError(f"--size {size} is too small for a face crop; use 8 or more (default 112)")
    check_side(size, "--size")
    if not 0.0 <= margin < 2.0:
        raise SiamkitError(f"--margin {margin} must be in [0, 2): the fraction of the face added on each side")
    centre = TEMPLATE_SIZE / 2
    return (TEMPLATE_112 - centre) * (size / TEMPLATE_SIZE) / (1 + 2 * margin) + size / 2


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation + uniform scale + translation taking ``src`` [N, 2] nearest to ``dst``
    [N, 2] in least squares (Umeyama 1991, without reflection). Exact when ``dst`` is a similarity of ``src``."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s == 0:
        raise ValueError("the source points coincide; no transform is defined")
    cov = d0.T @ s0 / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])  # forbid a reflection
    rot = u @ np.diag(d) @ vt
    scale = (sigma * d).sum() / var_s
    a = scale * rot
    return np.hstack([a, (mu_d - a @ mu_s)[:, None]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] through the 2x3 matrix m."""
    return np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]


def warp(image: Image.Image, m: np.ndarray, size: int) -> Image.Image:
    """The size x size crop whose pixel (x, y) shows the photo at m^-1 (x, y) (bilinear). Where the crop reaches
    past the photo's edge (tight crops, tilted faces) the edge pixels are repeated, not black: black wedges of
    varying shape would differ from image to image of the same person."""
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64) @ inv[:, :2].T + inv[:, 2]
    w, h = image.size
    reach = max(0.0, -corners.min(), (corners[:, 0] - (w - 1)).max(), (corners[:, 1] - (h - 1)).max())
    pad = int(min(np.ceil(reach) + 2, 2 * max(w, h)))  # beyond twice the photo's side there is nothing left to repeat
    if pad:
        arr = np.asarray(image)
        arr = np.pad(arr, ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2), mode="edge")
        image = Image.fromarray(arr, mode=image.mode)
        inv = inv.copy()
        inv[:, 2] += pad  # photo coordinates -> padded photo coordinates
    # m works on pixel-index coordinates (pixel i's centre at i, as dlib's landmarks are); PIL's affine maps the
    # output's continuous coordinates (pixel i spans [i, i+1)) to the input's, hence the half-pixel shifts.
    a = inv[:, :2]
    t = inv[:, 2] + 0.5 - a @ np.array([0.5, 0.5])
    coeffs = (a[0, 0], a[0, 1], t[0], a[1, 0], a[1, 1], t[1])
    return image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def pick_face(faces: list[Face], image_size: tuple[int, int], pick: str = "largest") -> Face:
    """One face of several: the largest box, or the one whose centre is nearest the photo's centre."""
    if pick == "largest":
        return max(faces, key=lambda f: f.area)
    if pick == "center":
        cx, cy = image_size[0] / 2, image_size[1] / 2
        return min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)
    raise SiamkitError(f"--pick {pick} is not one of: {', '.join(PICKS)}")


def photo_box(m: np.ndarray, photo_size: tuple[int, int], size: int) -> list[float]:
    """[left, top, right, bottom] in crop pixels: the upright box of the size x size crop made by ``m`` that shows
    the photo itself, not the repeated edge pixels beyond it. The photo's outline is turned in the crop; each side
    of the box is set by that side's inner corner (exact for an upright outline; for a turned one the box's corners
    may reach a sliver past the outline), and clipped to the crop. A tight crop of a face gives a box smaller than
    the crop; a photo with room around the face gives the whole crop [0, 0, size, size]."""
    w, h = photo_size
    # the photo's outline in crop coordinates, its corners as pixel edges (-0.5 .. w - 0.5 in index coordinates)
    c = apply(m, [[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]]) + 0.5
    xs, ys = c[:, 0], c[:, 1]
    # for an outline turned by less than 45 degrees, the inner upright box is bounded by the nearer of each side's
    # two corners; sort to find which corners are left/right and top/bottom whatever the turn
    xs_sorted, ys_sorted = np.sort(xs), np.sort(ys)
    box = [xs_sorted[1], ys_sorted[1], xs_sorted[2], ys_sorted[2]]
    return [round(float(min(max(v, 0.0), size)), 2) for v in box]


def align_face(image: Image.Image, face: Face, size: int = TEMPLATE_SIZE,
               margin: float = 0.0) -> tuple[Image.Image, list[float]]:
    """The face cut out and warped so that its landmarks land on the template (same mode as ``image``), and the
    box of the crop that shows the photo (`photo_box`)."""
    m = estimate_similarity(face.landmarks, template(size, margin))
    return warp(image, m, size), photo_box(m, image.size, size)
