"""Data sets as dlib's face chips, for the models that read them (the built-in ``dlib`` and runs fine-tuned from it).

Such a model makes its chips itself from what ``--data`` names: a folder of photos or raw crops, or a built-in face
set (the AT&T faces are detected on their original 92x112 images). The chips are cut once into siamkit's cache
(``<cache>/dlib-chips/<key>/``, keyed by the folder's files, written by ``siamkit align --template dlib`` with its
align_report.json, resumable) and then decoded through the decoded cache like any folder. A folder that
``siamkit align --template dlib`` wrote is used as it is; one aligned with siamkit's 112 px template is refused.
Photos without a detected face are skipped, as ``siamkit align`` skips them (its ``--undetected frame`` keeps them).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.cache import default_cache_dir, fingerprint
from ..data.sources import FOLDER, IdentityDataset, list_folder, load_source, native_preprocess, source_of
from ..errors import SiamkitError
from ..fileio import atomic_write
from .chips import DLIB_CHIP_SIZE, DLIB_TEMPLATE, dlib_alignment, is_dlib_chip
from .folder import AlignOptions, align_folder, align_photo, open_photo, read_alignment
from .use import check_chip_templates

CHIPS_DIR = "dlib-chips"
# Up to this many images the chips are cut in this process: starting worker processes would cost more.
IN_PROCESS_UP_TO = 200
# The chips' own pixels: what their folder's fingerprint is computed with.
_CHIP_PIXELS = dlib_alignment()["chip"]


def chip_folder(data: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """The folder of dlib chips of ``--data`` (a folder, or a built-in face set), cut now unless cut before."""
    base = _cache_base(cache_dir) / CHIPS_DIR
    if source_of(data) is not FOLDER:
        src = _materialise(data, base / "sources" / data)
    else:
        check_chip_templates(dlib_alignment(), data)  # a folder of 112 px crops: refused in one line
        if is_dlib_chip(read_alignment(data)):
            return data
        src = Path(data)
    names, files = list_folder(src)
    dst = base / _key(names, files, src)
    n = sum(len(f) for f in files)
    summary = align_folder(src, dst, AlignOptions.for_template(DLIB_TEMPLATE),
                           workers=1 if n <= IN_PROCESS_UP_TO else None, progress=progress)
    if not any(r.status.startswith("aligned") for r in summary.results):
        raise SiamkitError(f"no face found in any image of {data}; this model reads dlib's face chips, cut around "
                           f"detected faces: pass photos showing faces")
    return str(dst)


def _key(names: list[str], files: list[list[str]], root: Path) -> str:
    from ..data.pixels import Preprocess

    # fingerprint hashes the preprocessing too: the chip's size stands for it, with the chip's recipe in the name
    pre = Preprocess(image_size=(DLIB_CHIP_SIZE, DLIB_CHIP_SIZE), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    return fingerprint(names, files, root, pre) + "-" + hashlib.sha256(_CHIP_PIXELS.encode()).hexdigest()[:8]


def _cache_base(cache_dir: str | os.PathLike | None) -> Path:
    """--cache-dir (none: the default folder, since chips are worth keeping), else siamkit's cache folder."""
    if cache_dir is None or str(cache_dir).lower() == "none":
        return default_cache_dir()
    return Path(cache_dir)


def _materialise(name: str, folder: Path) -> Path:
    """A built-in face set written once as image files at its own size (faces are detected on those)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    pre = native_preprocess(name)
    if pre is None:
        raise SiamkitError(f"--data {name} holds no faces; a model that reads dlib's face chips needs photos of "
                           f"faces: a folder, or att, att-train, att-test, olivetti, lfw")
    ds = load_source(name, pre)
    for rel, pixels in zip(ds.paths, ds.images):
        image = _as_image(pixels)
        path = folder / rel
        atomic_write(path, lambda f, im=image, p=path: im.save(f, format=Image.registered_extensions().get(
            p.suffix.lower(), "PNG")))
    atomic_write(done, lambda f: f.write(b"ok\n"))
    return folder


def _as_image(pixels: torch.Tensor) -> Image.Image:
    arr = pixels.numpy().transpose(1, 2, 0)
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def dataset_chips(ds: IdentityDataset) -> tuple[torch.Tensor, int] | str:
    """dlib chips uint8 [N, 3, 150, 150] of ``ds``'s images, in its order, and how many had no detected face (cut
    with the whole frame as the face, as --undetected frame does); or why there are none (a string)."""
    alignment = read_alignment(ds.root) if ds.root and os.path.isdir(ds.root) else None
    if is_dlib_chip(alignment):
        if tuple(ds.images.shape[1:]) == (3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE):
            return (ds.images.read() if hasattr(ds.images, "read") else ds.images), 0
        photos = [open_photo(Path(ds.root) / p) for p in ds.paths]
    elif alignment:
        return (f"the images are faces aligned by siamkit align ({alignment['size']} px template): dlib's model needs "
                f"its own chip of the original photo")
    else:
        photos = _originals(ds)
        if isinstance(photos, str):
            return photos
    opts = AlignOptions.for_template(DLIB_TEMPLATE, undetected="frame")
    chips, undetected = [], 0
    for photo in photos:
        crop, result = align_photo(photo, opts)
        undetected += result.status != "aligned"
        chips.append(np.zeros((DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3), np.uint8) if crop is None else np.asarray(crop))
    return torch.from_numpy(np.stack(chips).transpose(0, 3, 1, 2).copy()), undetected


def _originals(ds: IdentityDataset) -> list[Image.Image] | str:
    """The images of ``ds`` as they were before preprocessing: a folder's files, a built-in set at its own size."""
    if ds.root and source_of(ds.root) is not FOLDER:
        pre = native_preprocess(ds.root)
        if pre is None:
            return f"{ds.root} holds no faces"
        native = load_source(ds.root, pre)
        row = {p: i for i, p in enumerate(native.paths)}
        return [_as_image(native.images[row[p]]) for p in ds.paths]
    if not ds.root or not os.path.isdir(ds.root):
        return "the images' files are not known (no data folder)"
    try:
        return [open_photo(Path(ds.root) / p) for p in ds.paths]
    except (ValueError, OSError) as e:
        return f"an image could not be read again ({e})"
