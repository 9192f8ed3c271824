"""The Python API: ``siamkit.load(run_or_checkpoint)`` -> Verifier."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data.sources import decode_image
from .data.transforms import Preprocess, image_to_uint8
from .errors import SiamkitError
from .eval.embed import embed_images
from .eval.verification import pair_scores
from .models.siamese import ModelSpec, SiameseNet
from .checkpoint import load_checkpoint, resolve_checkpoint



def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SiameseNet, dict]:
    """Rebuild the network from a checkpoint alone; returns (model in eval mode, checkpoint)."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    try:
        model = SiameseNet(ModelSpec(**ckpt["model_spec"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise SiamkitError(f"{ckpt_path} does not match this version of siamkit's models ({type(e).__name__}: {str(e)[:120]})") from None
    return model.to(device).eval(), ckpt


class Verifier:
    """Embeds images and says whether two show the same identity, with the model's own preprocessing."""

    def __init__(self, model: SiameseNet, preprocess: Preprocess, threshold: float | None, score: str, device="cpu",
                 flip: bool = False, alignment: dict | None = None, align: bool = False):
        self.model, self.preprocess, self.threshold, self.score_name = model, preprocess, threshold, score
        self.device = torch.device(device)
        self.flip = flip  # add mirrored images' embeddings, as the run did when it calibrated the threshold
        self.alignment = alignment  # how the training data was aligned (siamkit align), None if it was not
        self.align = align  # detect and align faces in raw photos before embedding them

    def _to_uint8(self, image, align: bool = False) -> torch.Tensor:
        from .faces.use import looks_aligned, warn_mismatch

        if align:
            from .faces.use import align_one

            warn_mismatch(self.alignment, True, "the images (--align)")
            return image_to_uint8(align_one(self._to_pil(image), self.alignment, str(image) if _is_path(image) else "the image"),
                                  self.preprocess)
        if _is_path(image):
            try:
                tensor = decode_image(image, self.preprocess)
            except ValueError as e:
                raise SiamkitError(f"cannot read image {image}: {e}") from None
            except FileNotFoundError:
                raise SiamkitError(f"image {image} does not exist") from None
        else:
            image = self._to_pil(image)
            tensor = image_to_uint8(image, self.preprocess)
        if self.alignment:  # a model trained on aligned faces checks that these look aligned (their size)
            with (Image.open(image) if _is_path(image) else nullcontext(image)) as im:
                warn_mismatch(self.alignment, looks_aligned(im, self.alignment), "the images")
        return tensor

    def _to_pil(self, image) -> Image.Image:
        if _is_path(image):
            from .faces.folder import open_photo

            try:
                return open_photo(image)
            except ValueError as e:
                raise SiamkitError(f"cannot read image {image}: {e}") from None
            except FileNotFoundError:
                raise SiamkitError(f"image {image} does not exist") from None
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3):
                image = image.transpose(1, 2, 0)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                image = np.clip(np.rint(image * 255.0 if image.max() <= 1.0 else image), 0, 255).astype(np.uint8)
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"cannot embed a {type(image).__name__}; pass paths, PIL images, arrays or tensors")
        return image

    def embed(self, images: Sequence, flip: bool | None = None, align: bool | None = None) -> np.ndarray:
        """Embeddings [N, D] of image paths, PIL images, HxW(xC) arrays or CxHxW tensors (flip None: the run's;
        align: detect and align the face of each raw photo first, as `siamkit align` does; None: the Verifier's)."""
        align = self.align if align is None else align
        batch = torch.stack([self._to_uint8(im, align) for im in images])
        return embed_images(self.model, batch, self.preprocess, self.device, flip=self.flip if flip is None else flip)

    def score(self, a, b, align: bool | None = None) -> float | np.ndarray:
        """Similarity of a and b (higher = more alike); a list of images on each side gives an array."""
        single = not isinstance(a, (list, tuple))
        ea, eb = self.embed([a] if single else a, align=align), self.embed([b] if single else b, align=align)
        s = pair_scores(ea, eb, self.score_name)
        return float(s[0]) if single else s

    def verify(self, a, b, threshold: float | None = None, align: bool | None = None) -> bool | np.ndarray:
        """True where a and b show the same identity (score >= threshold)."""
        t = self.threshold if threshold is None else threshold
        if t is None:
            raise SiamkitError("this checkpoint has no calibrated threshold (no held-out evaluation); pass threshold=")
        s = self.score(a, b, align=align)
        return bool(s >= t) if isinstance(s, float) else s >= t


def load(path: str | os.PathLike, device: str | torch.device = "cpu", align: bool = False) -> Verifier:
    """A Verifier for a run folder (its best.pt or last.pt) or a checkpoint file; ``align=True`` detects and
    aligns the face of every raw photo first (needs the align extra: pip install "siamkit[align]")."""
    model, ckpt = load_model(path, device)
    threshold = ckpt.get("threshold")
    if align:
        from .faces.detect import check_installed

        check_installed()  # the one-line install hint now, not at the first image
    return Verifier(model, Preprocess.from_dict(ckpt["preprocess"]), threshold, ckpt.get("score", "cosine"), device,
                    flip=run_flip(ckpt), alignment=ckpt.get("alignment"), align=align)


def _is_path(image) -> bool:
    return isinstance(image, (str, os.PathLike))


def run_flip(ckpt: dict) -> bool:
    """Whether the run evaluated (and calibrated its threshold) with mirrored images' embeddings added."""
    return bool(ckpt.get("config", {}).get("eval_flip", False))
