"""The Python API: ``siamkit.load(run_or_checkpoint)`` -> Verifier."""
from __future__ import annotations

import os
from pathlib import Path
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .calibration import run_calibration
from .checkpoint import load_checkpoint, require_finite_model, resolve_checkpoint, run_dir_of
from .data.transforms import Preprocess
from .errors import SiamkitError
from .eval.embed import embed_images
from .exported import is_exported, load_exported
from .faces.chips import is_dlib_chip
from .models.siamese import SiameseNet, network_of
from .models.zoo import builtin_model
from .models.zoo import checkpoint as checkpoint_of_builtin
from .progress import progress_bar
from .verifier import VerifierBase, as_pil, image_names, image_pixels, require_finite

EMBED_CHUNK = 256  # images per call in embed_pixels: the progress bar moves, and memory stays bounded


def open_run(path: str | os.PathLike) -> tuple[dict, Path]:
    """(checkpoint, run folder) of a run folder (its best.pt or last.pt), a checkpoint file, or a built-in model name
    (models/zoo.py: its checkpoint made from the installed weights, its folder in siamkit's cache). Every command
    that takes a run resolves it here."""
    builtin = builtin_model(path)
    if builtin is not None:
        return checkpoint_of_builtin(builtin), builtin.folder
    ckpt_path = resolve_checkpoint(path)
    return require_finite_model(load_checkpoint(ckpt_path), ckpt_path), run_dir_of(ckpt_path)


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SiameseNet, dict, Path]:
    """(model in eval mode, checkpoint, run folder) of a run, checkpoint or built-in model name (open_run)."""
    ckpt, run_dir = open_run(path)
    return network_of(ckpt, str(path)).to(device), ckpt, run_dir


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SiameseNet, dict]:
    """Rebuild the network from a checkpoint alone (or a built-in model); returns (model in eval mode, checkpoint)."""
    model, ckpt, _ = load_run(path, device)
    return model, ckpt


class Verifier(VerifierBase):
    """Embeds images and says whether two show the same identity, with the model's own preprocessing."""

    def __init__(self, model: SiameseNet, preprocess: Preprocess, threshold: float | None, score: str, device="cpu",
                 flip: bool = False, calibration: dict | None = None, alignment: dict | None = None,
                 align: bool = False, shifts: bool = False):
        self.model, self.preprocess, self.threshold, self.score_name = model, preprocess, threshold, score
        # The thresholds verify chooses from (calibration.py); a bare threshold is a calibration of its own.
        if calibration is None and threshold is not None:
            calibration = {"source": "the threshold given to Verifier", "threshold": threshold, "thresholds_at_far": {}}
        self.calibration = calibration
        self.device = torch.device(device)
        # The views whose embeddings are averaged (eval/embed.py view_embedding), as the run calibrated its threshold:
        # the mirror image, and four shifted copies.
        self.flip, self.shifts = flip, shifts
        self.alignment = alignment  # how the training data was aligned (siamkit align), None if it was not
        self.align = align  # detect and align faces in raw photos before embedding them

    def _to_uint8(self, image, align: bool = False) -> torch.Tensor:
        from .faces.use import warn_mismatch

        if align:
            from .faces.use import align_one

            warn_mismatch(self.alignment, True, "the images (--align)")
            face = align_one(_to_pil(image), self.alignment, str(image) if _is_path(image) else "the image")
            return torch.from_numpy(image_pixels(face, self.preprocess))
        pixels = torch.from_numpy(image_pixels(image, self.preprocess))
        if self.alignment:  # a model trained on aligned faces checks that these look aligned (their size)
            from .faces.use import looks_aligned

            with (Image.open(image) if _is_path(image) else nullcontext(_to_pil(image))) as im:
                warn_mismatch(self.alignment, looks_aligned(im, self.alignment), "the images")
        return pixels

    def embed(self, images: Sequence, flip: bool | None = None, align: bool | None = None) -> np.ndarray:
        """Embeddings [N, D] of image paths, PIL images, HxW(xC) arrays or CxHxW tensors (flip None: the run's;
        align: detect and align the face of each raw photo first, as `siamkit align` does; None: the Verifier's)."""
        align = self.align if align is None else align
        batch = torch.stack([self._to_uint8(im, align) for im in images])
        emb = embed_images(self.model, batch, self.preprocess, self.device, flip=self.flip if flip is None else flip,
                           shifts=self.shifts)
        return require_finite(emb, image_names(images))

    def pixels(self, image) -> np.ndarray:
        """uint8 [C, H, W] of one image as ``embed`` sees it (aligned first if the Verifier aligns): embed_pixels of
        a stack of these equals embed of the images (what siamkit serve batches)."""
        return self._to_uint8(image, self.align).numpy()

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor, progress: bool = False) -> np.ndarray:
        """Embeddings [N, D] of uint8 pixels [N, C, H, W] at the model's size, with the run's views (flip, shifts),
        in chunks behind a progress bar (as ExportedVerifier.embed_pixels)."""
        pixels = torch.as_tensor(pixels)
        return np.concatenate([
            embed_images(self.model, pixels[i:i + EMBED_CHUNK], self.preprocess, self.device, flip=self.flip,
                         shifts=self.shifts)
            for i in progress_bar(range(0, len(pixels), EMBED_CHUNK), desc="embed", unit="chunk", disable=not progress)])


def load(path: str | os.PathLike, device: str | torch.device = "cpu", align: bool = False) -> VerifierBase:
    """A Verifier for a run folder (its best.pt or last.pt) or a checkpoint file; an ExportedVerifier for an
    exported .onnx file (siamkit.load reaches it without importing torch). ``align=True`` detects and aligns the
    face of every raw photo first (needs the align extra: pip install "siamkit[align]").

    Its thresholds: the run's calibration.json (evaluate --calibrate) if there is one, else the training's.
    """
    if is_exported(path):
        return load_exported(path, align=align)
    model, ckpt, run_dir = load_run(path, device)
    calibration = run_calibration(run_dir, ckpt)
    threshold = None if calibration is None else calibration["threshold"]
    # A model that reads dlib's face chips cuts them itself from every photo (faces/chips.py).
    align = align or is_dlib_chip(ckpt.get("alignment"))
    if align:
        from .faces.detect import check_installed

        check_installed()  # the one-line install hint now, not at the first image
    return Verifier(model, Preprocess.from_dict(ckpt["preprocess"]), threshold, ckpt.get("score", "cosine"), device,
                    flip=run_flip(ckpt), calibration=calibration, alignment=ckpt.get("alignment"), align=align,
                    shifts=run_shifts(ckpt))


def _is_path(image) -> bool:
    return isinstance(image, (str, os.PathLike))


def _to_pil(image) -> Image.Image:
    """A PIL image of a path (opened as siamkit align opens photos), PIL image, array or tensor."""
    if not _is_path(image):
        return as_pil(image)
    from .faces.folder import open_photo

    try:
        return open_photo(image)
    except ValueError as e:
        raise SiamkitError(f"cannot read image {image}: {e}") from None
    except FileNotFoundError:
        raise SiamkitError(f"image {image} does not exist") from None


def run_flip(ckpt: dict) -> bool:
    """Whether the run evaluated (and calibrated its threshold) with mirrored images' embeddings added."""
    return bool(ckpt.get("config", {}).get("eval_flip", False))


def run_shifts(ckpt: dict) -> bool:
    """Whether the run evaluated (and calibrated its threshold) with shifted copies' embeddings added (runs from
    before --eval-shifts did not)."""
    return bool(ckpt.get("config", {}).get("eval_shifts", False))
