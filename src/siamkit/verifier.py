"""What every verifier does once it can embed images: score, verify at a calibrated threshold, read images.

Torch-free: ``api.Verifier`` (a PyTorch model) and ``exported.ExportedVerifier`` (an ONNX file run by
onnxruntime) differ only in ``embed``.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from .calibration import choose_threshold, pick_threshold
from .data.pixels import Preprocess, decode_image_array, image_to_array, too_small
from .errors import SiamkitError
from .eval.verification import pair_scores


def image_pixels(image, pre: Preprocess, small: list | None = None) -> np.ndarray:
    """uint8 [C, H, W] at the model's size from a path, PIL image, HxW(xC) array or CxHxW tensor.

    A file under MIN_IMAGE_SIDE pixels a side is refused (a blur of a few pixels scored as if it were a photo would
    be a wrong answer), or, given a list ``small`` (a folder's loader, which warns once), appended to it as
    (path, why) and kept."""
    if isinstance(image, (str, os.PathLike)):
        sizes: list = []
        try:
            pixels = decode_image_array(image, pre, sizes)
            if too_small(sizes[0]) and small is None:
                raise ValueError(too_small(sizes[0]))
            if too_small(sizes[0]):
                small.append((str(image), too_small(sizes[0])))
            return pixels
        except ValueError as e:
            raise SiamkitError(f"cannot read image {image}: {e}") from None
        except FileNotFoundError:
            raise SiamkitError(f"image {image} does not exist") from None
    return image_to_array(as_pil(image), pre)


def image_names(images: Sequence) -> list[str]:
    """How error lines name each of ``images``: a path as given, anything else by its position."""
    return [str(im) if isinstance(im, (str, os.PathLike)) else f"image {i} of the batch" for i, im in enumerate(images)]


def require_finite(embeddings: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``embeddings`` [N, D], if every row is finite; else one line naming the first image whose row is not.

    A NaN or infinite embedding scores as nothing at all (every comparison with NaN is false), so it is never
    written, enrolled or scored.
    """
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1)) if embeddings.size else []
    if len(bad):
        more = f" (and of {len(bad) - 1} other image(s))" if len(bad) > 1 else ""
        raise SiamkitError(f"the embedding of {names[bad[0]]} is not finite (NaN or infinity){more}: the model "
                           f"overflows on it, so nothing is scored or written; check the image, and evaluate the "
                           f"model on a data set")
    return embeddings


def as_pil(image) -> Image.Image:
    """A PIL image of a PIL image, an HxW(xC) array (uint8, or floats in [0, 1]) or a CxHxW tensor."""
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor, recognised without importing torch
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


class VerifierBase:
    """Scores and decisions on top of ``embed``; thresholds from ``calibration`` (see calibration.py)."""

    preprocess: Preprocess
    score_name: str
    threshold: float | None
    calibration: dict | None

    def embed(self, images: Sequence, align: bool | None = None) -> np.ndarray:
        raise NotImplementedError

    def score(self, a, b) -> float | np.ndarray:
        """Similarity of a and b (higher = more alike); a list of images on each side gives an array."""
        single = not isinstance(a, (list, tuple))
        ea, eb = self.embed([a] if single else a), self.embed([b] if single else b)
        s = pair_scores(ea, eb, self.score_name)
        return float(s[0]) if single else s

    def verify(self, a, b, threshold: float | None = None, far: float | None = None) -> bool | np.ndarray:
        """True where a and b show the same identity (score >= threshold).

        The threshold: ``threshold`` if given, else the one calibrated at false-accept rate ``far`` (1e-1, 1e-2,
        1e-3: see ``calibration["thresholds_at_far"]``), else the calibrated accuracy-maximising one.
        """
        t = self.decision_threshold(threshold, far)[0]
        s = self.score(a, b)
        return bool(s >= t) if isinstance(s, float) else s >= t

    def decision_threshold(self, threshold: float | None = None, far: float | None = None,
                           names: tuple[str, str] = ("threshold=", "far=")) -> tuple[float, str]:
        """(threshold, what it is): ``threshold`` checked against the score's range, else the calibrated one (at
        ``far``); both given is refused as the command line refuses --threshold beside --far."""
        if threshold is None and far is None and self.threshold is not None:
            return self.threshold, "the verifier's threshold"
        return pick_threshold(self.calibration, threshold, far, self.score_name, names)

    def threshold_for(self, far: float | None = None) -> float:
        """The calibrated threshold at false-accept rate ``far`` (None: the accuracy-maximising one)."""
        if far is None and self.threshold is not None:
            return self.threshold
        return choose_threshold(self.calibration, far)[0]

    def identify(self, images: Sequence, gallery, k: int = 5, threshold: float | None = None,
                 far: float | None = None, backend: str = "exact", model_name: str = "this model") -> list[dict]:
        """Who of ``gallery`` (a folder written by siamkit enroll, or a gallery.Gallery) is in each image?

        One dict per image: ``identity`` (None when the best score is below the threshold: unknown), ``score``
        (the best identity's) and ``top_k`` ([(name, score), ...], best first). The threshold as in ``verify``;
        ``model_name``: how a gallery enrolled with another model names this one.
        """
        from .gallery import Gallery, load_gallery, model_probe

        g = gallery if isinstance(gallery, Gallery) else load_gallery(gallery)
        g.check_model(model_probe(self), model_name)
        t = self.decision_threshold(threshold, far)[0]
        ids, scores = g.search(self.embed(list(images)), k, backend)
        return [{"identity": g.names[row[0]] if s[0] >= t else None, "score": float(s[0]),
                 "top_k": [(g.names[i], float(x)) for i, x in zip(row, s)]} for row, s in zip(ids, scores)]
