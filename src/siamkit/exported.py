"""An exported ONNX model run through onnxruntime: embed, score and verify without PyTorch.

Nothing here imports torch or torchvision (tests/test_exported.py runs it with torch made unimportable):
images are decoded by data/pixels.py, the graph does the rest (export.py), and the preprocessing,
score and calibrated thresholds come from the file's metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.pixels import Preprocess, list_image_folder, warn_small
from .errors import SiamkitError, warn
from .progress import progress_bar
from .verifier import VerifierBase, as_pil, image_names, image_pixels, require_finite

EXPORT_FORMAT = "siamkit-export-v1"  # export.py writes it; kept here too so that this module needs no torch
BATCH = 256
HASH_PLACEHOLDER = "0" * 64  # where the file's sha256 stands while it is hashed (export.py)


def hash_field(digest: str) -> bytes:
    """The bytes of the metadata's sha256 entry as json.dumps writes it inside the file."""
    return f'"sha256": "{digest}"'.encode()


def check_export_hash(data: bytes, digest: str, path: Path) -> None:
    """Refuse an exported file whose bytes do not hash to the sha256 stored in its metadata."""
    unhashed = data.replace(hash_field(digest), hash_field(HASH_PLACEHOLDER), 1)
    if hashlib.sha256(unhashed).hexdigest() != digest:
        raise SiamkitError(f"{path} is damaged: its bytes do not match the sha256 stored in it at export (a disk or "
                           f"copy error changed it); export the run again with siamkit export")


def is_exported(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def onnx_session(model: bytes | str | os.PathLike):
    """An onnxruntime session on the CPU, from a file or its bytes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SiamkitError('running an exported .onnx model needs onnxruntime: pip install "siamkit[export]"') from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class ExportedVerifier(VerifierBase):
    """``siamkit.load("model.onnx")``: the same embed / score / verify as a run's Verifier, through onnxruntime."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise SiamkitError(f"{path} does not exist; pass a file written by siamkit export")
        try:
            data = path.read_bytes()
            self.session = onnx_session(data)
        except SiamkitError:
            raise
        except Exception as e:  # onnxruntime raises its own types for a damaged or foreign file
            raise SiamkitError(f"{path} is not a readable ONNX model ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120]}); export it again with siamkit export") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("siamkit")
        try:
            self.metadata = json.loads(raw)
            if self.metadata.get("format") != EXPORT_FORMAT:
                raise ValueError(self.metadata.get("format"))
        except (TypeError, ValueError, AttributeError):
            raise SiamkitError(f"{path} is an ONNX model but not one siamkit exported (no '{EXPORT_FORMAT}' "
                               f"metadata); export a run with siamkit export RUN --format onnx") from None
        if self.metadata.get("sha256"):  # exports from before the hash have none
            check_export_hash(data, self.metadata["sha256"], path)
        self.path = path
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.score_name = self.metadata["score"]
        self.calibration = self.metadata.get("calibration")
        self.threshold = None if self.calibration is None else float(self.calibration["threshold"])
        self.alignment = self.metadata.get("alignment")  # as api.Verifier's: how its run's training data was aligned

    @property
    def reads_dlib_chips(self) -> bool:
        """Whether the model reads dlib's face chips, which it then cuts itself from every photo (faces/chips.py)."""
        from .faces.chips import is_dlib_chip

        return is_dlib_chip(self.alignment)

    def embed(self, images: Sequence, align: bool | None = None) -> np.ndarray:
        """Embeddings [N, D] of image paths, PIL images, HxW(xC) arrays or CxHxW tensors (a model that reads dlib's
        face chips cuts them from the photos first, unless ``align`` is False: the images are chips already)."""
        names = image_names(images)
        emb = self.embed_pixels(np.stack([self.pixels(im, align) for im in images]))
        return require_finite(emb, names)

    def pixels(self, image, align: bool | None = None) -> np.ndarray:
        """uint8 [C, H, W] of one image as ``embed`` sees it (a dlib chip cut first, unless ``align`` is False)."""
        if self.reads_dlib_chips and align is not False:
            image = self._chip(image)
        return image_pixels(image, self.preprocess)

    def _chip(self, image):
        from .faces.folder import open_photo
        from .faces.use import align_one

        if not isinstance(image, (str, os.PathLike)):
            return align_one(as_pil(image), self.metadata["alignment"], "the image")
        try:
            photo = open_photo(image)
        except (ValueError, FileNotFoundError) as e:
            raise SiamkitError(f"cannot read image {image}: {e}") from None
        return align_one(photo, self.metadata["alignment"], str(image))

    def embed_pixels(self, pixels: np.ndarray, progress: bool = False) -> np.ndarray:
        """Embeddings [N, D] of uint8 pixels [N, C, H, W] at the model's size."""
        pixels = np.asarray(pixels)
        starts = range(0, len(pixels), BATCH)
        out = [self.session.run(None, {"images": pixels[i:i + BATCH]})[0]
               for i in progress_bar(starts, desc="embed", unit="batch", disable=not progress)]
        return np.concatenate(out)


def embed_folder(verifier: ExportedVerifier, root: str | os.PathLike, progress: bool = True) -> dict:
    """A folder of identity sub-folders -> {"embeddings", "labels", "names", "paths"} as siamkit embed writes them.

    Unreadable images are skipped with one warning, as when training or evaluating on the folder.
    """
    if verifier.reads_dlib_chips:
        from .faces.chips import is_dlib_chip
        from .faces.folder import read_alignment

        if not is_dlib_chip(read_alignment(root)):
            raise SiamkitError(f"this exported model reads dlib's face chips: pass a folder written by siamkit align "
                               f"--template dlib (or embed {root} with the model itself, which cuts the chips)")
    names, files = list_image_folder(root)
    pixels, labels, paths, bad, small = [], [], [], [], []
    for label, folder in enumerate(files):
        for rel in folder:
            try:
                pixels.append(image_pixels(os.path.join(root, rel), verifier.preprocess, small))
            except SiamkitError as e:
                bad.append(str(e).removeprefix("cannot read image "))
                continue
            labels.append(label)
            paths.append(rel)
    if bad:
        warn(f"skipped {len(bad)} unreadable image(s): {'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}")
    warn_small("", small)  # kept, as the PyTorch side's loaders keep them (paths already joined to the root)
    if not pixels:
        raise SiamkitError(f"no readable images in {root}; check the files are images Pillow can open")
    used = sorted(set(labels))  # identities whose every image was unreadable drop out, labels stay 0..K-1
    remap = {old: new for new, old in enumerate(used)}
    embeddings = require_finite(verifier.embed_pixels(np.stack(pixels), progress), paths)
    return {"embeddings": embeddings,
            "labels": np.array([remap[label] for label in labels]), "names": [names[i] for i in used],
            "paths": paths}


def load_exported(path: str | os.PathLike, align: bool = False) -> ExportedVerifier:
    if align:
        raise SiamkitError(f"--align needs the run or checkpoint that {path} was exported from (face detection runs "
                           f"beside PyTorch); with the exported model, align the photos first: siamkit align SRC DST")
    return ExportedVerifier(path)
