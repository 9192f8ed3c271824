"""The Python API: ``siamkit.load(run_or_checkpoint)`` -> Verifier."""
from __future__ import annotations

import os
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
from .calibration import choose_threshold, run_calibration
from .checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of



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
                 flip: bool = False, calibration: dict | None = None):
        self.model, self.preprocess, self.threshold, self.score_name = model, preprocess, threshold, score
        # The thresholds verify chooses from (calibration.py); a bare threshold is a calibration of its own.
        if calibration is None and threshold is not None:
            calibration = {"source": "the threshold given to Verifier", "threshold": threshold, "thresholds_at_far": {}}
        self.calibration = calibration
        self.device = torch.device(device)
        self.flip = flip  # add mirrored images' embeddings, as the run did when it calibrated the threshold

    def _to_uint8(self, image) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            try:
                return decode_image(image, self.preprocess)
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
        return image_to_uint8(image, self.preprocess)

    def embed(self, images: Sequence, flip: bool | None = None) -> np.ndarray:
        """Embeddings [N, D] of image paths, PIL images, HxW(xC) arrays or CxHxW tensors (flip None: the run's)."""
        batch = torch.stack([self._to_uint8(im) for im in images])
        return embed_images(self.model, batch, self.preprocess, self.device, flip=self.flip if flip is None else flip)

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
        if threshold is not None and far is not None:
            raise SiamkitError("pass threshold= or far=, not both")
        t = threshold if threshold is not None else self.threshold_for(far)
        s = self.score(a, b)
        return bool(s >= t) if isinstance(s, float) else s >= t

    def threshold_for(self, far: float | None = None) -> float:
        """The calibrated threshold at false-accept rate ``far`` (None: the accuracy-maximising one)."""
        if far is None and self.threshold is not None:
            return self.threshold
        return choose_threshold(self.calibration, far)[0]


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Verifier:
    """A Verifier for a run folder (its best.pt or last.pt) or a checkpoint file.

    Its thresholds: the run's calibration.json (evaluate --calibrate) if there is one, else the training's.
    """
    model, ckpt = load_model(path, device)
    calibration = run_calibration(run_dir_of(resolve_checkpoint(path)), ckpt)
    threshold = None if calibration is None else calibration["threshold"]
    return Verifier(model, Preprocess.from_dict(ckpt["preprocess"]), threshold, ckpt.get("score", "cosine"), device,
                    flip=run_flip(ckpt), calibration=calibration)


def run_flip(ckpt: dict) -> bool:
    """Whether the run evaluated (and calibrated its threshold) with mirrored images' embeddings added."""
    return bool(ckpt.get("config", {}).get("eval_flip", False))
