"""Alignment at use time (`--align` / ``align=True``): raw photos aligned as the model's training data was,
and one warning when a model trained on aligned faces meets unaligned images, or the reverse."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..errors import SiamkitError, warn
from .align import pick_face
from .chips import DLIB_TEMPLATE, cut_face, is_dlib_chip
from .detect import detect_faces
from .folder import REPORT, AlignOptions, align_folder, read_alignment

_warned: set[str] = set()


def options_for(alignment: dict | None) -> AlignOptions:
    """Align as the model's training data was (its size and margin); siamkit's defaults for a model without."""
    if not alignment:
        return AlignOptions()
    if is_dlib_chip(alignment):
        return AlignOptions.for_template(DLIB_TEMPLATE)
    return AlignOptions(size=int(alignment["size"]), margin=float(alignment["margin"]))


def align_one(image: Image.Image, alignment: dict | None, name: str = "the image") -> Image.Image:
    """The largest face of a photo, aligned; one clear error when there is none."""
    faces = detect_faces(image)
    if not faces and is_dlib_chip(alignment):
        raise SiamkitError(f"no face found in {name}; this model cuts dlib's face chip around a detected face: pass a "
                           f"photo showing a face (a folder aligned by siamkit align --template dlib --undetected frame "
                           f"keeps such photos)")
    if not faces:
        raise SiamkitError(f"no face found in {name}; pass a photo showing a face, or a ready crop without --align")
    opts = options_for(alignment)
    return cut_face(image, pick_face(faces, image.size, opts.pick), opts.template, opts.size, opts.margin)[0]


def align_data(folder: str | os.PathLike, alignment: dict | None, cache: str | os.PathLike) -> str:
    """An aligned copy of a data folder in ``cache`` (resumable: a rerun with the same cache reuses it)."""
    if not Path(folder).is_dir():
        raise SiamkitError(f"--align needs a folder of photos, not {folder}")
    align_folder(folder, cache, options_for(alignment))
    return str(cache)


def check_chip_templates(model_alignment: dict | None, data: str | os.PathLike) -> None:
    """A folder aligned with siamkit's template given to a model that reads dlib chips: refused; dlib chips given to a
    model trained on siamkit's template: one warning."""
    folder_alignment = read_alignment(data) if os.path.isdir(data) else None
    if not folder_alignment:
        return
    if is_dlib_chip(model_alignment) and not is_dlib_chip(folder_alignment):
        raise SiamkitError(f"{data} holds faces aligned by siamkit align with the {folder_alignment['size']} px "
                           f"template, and this model reads dlib's 150 px face chips: pass the original photos (it "
                           f"cuts the chips itself) or a folder written by siamkit align --template dlib")
    if model_alignment and not is_dlib_chip(model_alignment) and is_dlib_chip(folder_alignment):
        key = "dlib chips"
        if key not in _warned:
            _warned.add(key)
            warn(f"{data} holds dlib's 150 px face chips (siamkit align --template dlib), and this model was trained "
                 f"on siamkit's {model_alignment['size']} px template: expect lower accuracy; pass the photos with "
                 f"--align, or a folder aligned by siamkit align --size {model_alignment['size']}")


def is_aligned_folder(folder: str | os.PathLike) -> bool:
    return os.path.isdir(folder) and (Path(folder) / REPORT).is_file() and read_alignment(folder) is not None


def warn_mismatch(model_alignment: dict | None, images_aligned: bool, what: str) -> None:
    """Warn once per process when the model's training data and these images differ in alignment."""
    if model_alignment and not images_aligned:
        key, text = "unaligned", (f"this model was trained on aligned faces ({model_alignment['size']}x"
                                  f"{model_alignment['size']}, siamkit align) but {what} are not aligned; "
                                  f"pass --align (align=True) for raw photos")
    elif not model_alignment and images_aligned:
        key, text = "aligned", (f"this model was trained on unaligned images but {what} are aligned faces; "
                                f"expect lower accuracy, or train on a folder written by `siamkit align`")
    else:
        return
    if key not in _warned:
        _warned.add(key)
        warn(text)


def looks_aligned(image: Image.Image, model_alignment: dict | None) -> bool:
    """A single image counts as aligned when it has the size of the model's aligned crops (no report to read)."""
    return bool(model_alignment) and image.size == (model_alignment["size"],) * 2
