"""From an image file or PIL image to the model's uint8 pixels [C, H, W], without PyTorch.

Training, evaluation, the Python API and an exported model (which runs without torch) all decode images
here, so they see the same pixels.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import SiamkitError, warn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# The Pillow decoders tried on a file, whatever its extension: the formats above and no others (e.g. not EPS,
# which hands the file to Ghostscript), so a disguised file meets only the common, well-fuzzed decoders.
PILLOW_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")
# Refuse images above this many pixels before decoding them (decompression-bomb guard).
MAX_IMAGE_PIXELS = 40_000_000
# Below this many pixels a side an image holds too little to tell anyone apart (`siamkit align` finds no face in it,
# faces/folder.py MIN_SIDE): verify refuses to score it, and a data folder's loaders warn about it (kept, so that
# training data and its results stay as they were: ROF-neutral holds three 12x16 crops).
MIN_IMAGE_SIDE = 16
# What decoding does to a file's pixels, part of the decoded cache's fingerprint: a change here (2: the EXIF
# orientation applied) gives every cache a new key, so no cache of the old pixels is reused.
DECODING_VERSION = 2
EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera or phone sets instead of rotating the pixels it stores


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phones store a photo sideways (or mirrored) with an EXIF orientation
    tag instead of turning its pixels; every decoder in siamkit applies the tag (Pillow does not)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img  # no copy for the usual case: an upright photo, or a format without EXIF (PGM, most PNGs)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: stored in every checkpoint and reused at evaluation."""

    image_size: tuple[int, int]  # (H, W)
    center_crop: float = 1.0  # fraction of the shorter side kept around the centre
    channels: int = 3  # 1 = greyscale, 3 = RGB
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # [left, top, right, bottom] as fractions of the image: beyond this box the image is filled from the box's edge
    # (`fill_beyond`). Set for models trained on aligned tight crops (train --photo-box auto), None otherwise.
    fill_box: tuple[float, float, float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.fill_box is None:
            del d["fill_box"]  # as before the field existed: older decoded caches keep their keys
        else:
            d["fill_box"] = list(self.fill_box)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            image_size=tuple(d["image_size"]),
            center_crop=float(d["center_crop"]),
            channels=int(d["channels"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            fill_box=tuple(float(v) for v in d["fill_box"]) if d.get("fill_box") else None,
        )


def fill_beyond(img: Image.Image, box: Sequence[float] | None) -> Image.Image:
    """The image with every pixel outside ``box`` [left, top, right, bottom] (pixels) replaced by the box's nearest
    edge pixel. Aligned crops of tight face crops show the crop's repeated edge pixels where the photo ended
    (faces/align.py warp); a crop of a wider photo shows background there instead, which the model never saw in
    training. Filling beyond the training crops' photo box, in training and at every use, shows it the same."""
    if box is None:
        return img
    w, h = img.size
    left, top = min(max(int(round(box[0])), 0), w - 1), min(max(int(round(box[1])), 0), h - 1)
    right, bottom = max(min(int(round(box[2])), w), left + 1), max(min(int(round(box[3])), h), top + 1)
    if (left, top, right, bottom) == (0, 0, w, h):
        return img
    arr = np.asarray(img)[top:bottom, left:right]
    pad = ((top, h - bottom), (left, w - right)) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="edge"), mode=img.mode)


def image_to_array(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Centre-crop, resize and convert a PIL image to a uint8 array [C, H, W]."""
    img = img.convert("L" if pre.channels == 1 else "RGB")
    if pre.fill_box is not None:
        w, h = img.size
        left, top, right, bottom = pre.fill_box
        img = fill_beyond(img, (left * w, top * h, right * w, bottom * h))
    if pre.center_crop < 1.0:
        w, h = img.size
        side = min(w, h) * pre.center_crop
        # Keep the aspect ratio of the target size inside the crop.
        th, tw = pre.image_size
        ch, cw = (side, side * tw / th) if th >= tw else (side * th / tw, side)
        left, top = (w - cw) / 2, (h - ch) / 2
        img = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    h, w = pre.image_size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR, reducing_gap=None)
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on Pillow's read-only buffer
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image_array(path: str | os.PathLike, pre: Preprocess, sizes: list | None = None) -> np.ndarray:
    """Decode one image file to a uint8 array [C, H, W]; raise ValueError with a short reason if it is unusable.
    ``sizes``: the image's (width, height) as seen upright is appended to it (see MIN_IMAGE_SIDE)."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"{w}x{h} pixels is too large (limit {MAX_IMAGE_PIXELS:,})")
            if w == 0 or h == 0:
                raise ValueError("image has no pixels")
            img.load()
            img = upright(img)
            if sizes is not None:
                sizes.append(img.size)
            return image_to_array(img, pre)
    except ValueError:
        raise
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large, refused before decoding ({_first_line(e)})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(_first_line(e)) from None
    except MemoryError:
        raise ValueError("too large to decode in memory") from None
    except Exception as e:  # Pillow's decoders raise many types on crafted files (struct.error, IndexError...)
        raise ValueError(f"not a decodable image ({type(e).__name__}: {_first_line(e)})") from None


def too_small(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (width, height) is too small to tell anyone apart, or None."""
    w, h = size
    if min(w, h) >= MIN_IMAGE_SIDE:
        return None
    return f"{w}x{h} pixels is too small to tell anyone apart (at least {MIN_IMAGE_SIDE} px a side, as siamkit align requires)"


def warn_small(root: str | os.PathLike, small: list) -> None:
    """One warning for a folder's images under MIN_IMAGE_SIDE: [(relative path, why), ...]; they stay in the data."""
    if small:
        shown = "; ".join(f"{os.path.join(root, rel)} ({why})" for rel, why in small[:5])
        more = f"; and {len(small) - 5} more" if len(small) > 5 else ""
        warn(f"{len(small)} image(s) too small to tell anyone apart, used as they are: {shown}{more}; check them")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def list_image_folder(root: str | os.PathLike, builtin: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Identity names and their candidate image files (paths relative to ``root``), sorted; clear errors for
    unusable folders. Plain strings, not Paths: at 100,000 files, building and sorting Path objects took seconds.

    ``builtin``: the names of built-in sources, offered in the error for a folder that does not exist.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise SiamkitError(
            f"data folder {root} does not exist; pass a folder with one sub-folder per identity"
            + (f", or one of: {', '.join(builtin)}" if builtin else "")
        )
    if not root_path.is_dir():
        raise SiamkitError(f"--data {root} is a file, not a folder; pass a folder with one sub-folder per identity")
    names: list[str] = []
    files: list[list[str]] = []
    try:
        entries = sorted(os.scandir(root_path), key=lambda e: e.name)
    except OSError as e:
        raise SiamkitError(f"cannot read data folder {root}: {e.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # follows links; a broken link reads as "not a folder"
        except OSError as e:  # a symlink loop (ELOOP) or an unreadable entry
            warn(f"skipped {entry.path}: {e.strerror}")
            is_dir = False
        if not is_dir:
            continue
        try:
            images = sorted(
                f.name
                for f in os.scandir(entry.path)
                if not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS) and _is_file(f)
            )
        except OSError as e:
            warn(f"skipped identity folder {entry.path}: {e.strerror}")
            continue
        if images:
            names.append(entry.name)
            files.append([f"{entry.name}{os.sep}{name}" for name in images])
    if not names:
        raise SiamkitError(
            f"data folder {root} has no identity sub-folders with images; expected {root}/<identity>/<image>.jpg "
            f"(formats: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )
    return names, files


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return True  # a symlink loop or unreadable entry: decoding reports it among the skipped images
