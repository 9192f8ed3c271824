"""dlib's face chip: the 150x150 RGB crop dlib's face ResNet reads, cut by dlib's own ``get_face_chip``.

The face and its 5 landmarks come from faces/detect.py, as for siamkit's own 112 px template; the chip itself is
dlib's (``dlib.get_face_chip(image, full_object_detection, size=150, padding=0.25)``, not a re-implementation of its
sampling), so that the network sees what it was trained on. Grey photos become RGB first (the three channels equal).
A folder written by ``siamkit align --template dlib`` records ``"template": "dlib"`` in its alignment.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .align import align_face
from .detect import DETECTOR_DESCRIPTION, LANDMARK_NAMES, Face, dlib_module

DLIB_TEMPLATE = "dlib"
TEMPLATES = ("siamkit", DLIB_TEMPLATE)  # siamkit align --template
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25


def dlib_alignment() -> dict:
    """The alignment record of dlib chips (align_report.json, checkpoints, exported metadata)."""
    return {"template": DLIB_TEMPLATE, "size": DLIB_CHIP_SIZE, "margin": 0.0, "padding": DLIB_CHIP_PADDING,
            "landmarks": list(LANDMARK_NAMES), "detector": DETECTOR_DESCRIPTION,
            "chip": f"dlib.get_face_chip(image, 5 landmarks, size={DLIB_CHIP_SIZE}, padding={DLIB_CHIP_PADDING})",
            "photo_box": None}


def is_dlib_chip(alignment: dict | None) -> bool:
    """Whether an alignment record (a model's or a folder's) is dlib's face chip."""
    return bool(alignment) and alignment.get("template") == DLIB_TEMPLATE


def dlib_chip(image: Image.Image, face: Face, size: int = DLIB_CHIP_SIZE,
              padding: float = DLIB_CHIP_PADDING) -> Image.Image:
    """dlib's chip of ``face`` (landmarks in ``image``'s pixels) as an RGB image of size x size."""
    dlib = dlib_module()
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    # dlib's landmarks are whole pixels (its shape predictor returns points of longs): round ours the same way.
    parts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
    box = dlib.rectangle(*(int(round(v)) for v in face.box))
    chip = dlib.get_face_chip(rgb, dlib.full_object_detection(box, parts), size=size, padding=padding)
    return Image.fromarray(np.asarray(chip, dtype=np.uint8), mode="RGB")


def cut_face(image: Image.Image, face: Face, template: str, size: int, margin: float
             ) -> tuple[Image.Image, list[float] | None]:
    """The crop of ``face`` for a template: dlib's chip (no photo box), or siamkit's warp and its photo box."""
    if template == DLIB_TEMPLATE:
        return dlib_chip(image, face, size), None
    return align_face(image, face, size, margin)
