"""The Python API: ``siamkit.load(run_or_checkpoint)`` -> Verifier."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .data.transforms import Preprocess
from .errors import SiamkitError
from .eval.embed import embed_images
from .models.siamese import ModelSpec, SiameseNet
from .calibration import run_calibration
from .checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of
from .exported import is_exported, load_exported
from .verifier import VerifierBase, image_pixels



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


class Verifier(VerifierBase):
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
        return torch.from_numpy(image_pixels(image, self.preprocess))

    def embed(self, images: Sequence, flip: bool | None = None) -> np.ndarray:
        """Embeddings [N, D] of image paths, PIL images, HxW(xC) arrays or CxHxW tensors (flip None: the run's)."""
        batch = torch.stack([self._to_uint8(im) for im in images])
        return embed_images(self.model, batch, self.preprocess, self.device, flip=self.flip if flip is None else flip)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> VerifierBase:
    """A Verifier for a run folder (its best.pt or last.pt) or a checkpoint file; an ExportedVerifier for an
    exported .onnx file (siamkit.load reaches it without importing torch).

    Its thresholds: the run's calibration.json (evaluate --calibrate) if there is one, else the training's.
    """
    if is_exported(path):
        return load_exported(path)
    model, ckpt = load_model(path, device)
    calibration = run_calibration(run_dir_of(resolve_checkpoint(path)), ckpt)
    threshold = None if calibration is None else calibration["threshold"]
    return Verifier(model, Preprocess.from_dict(ckpt["preprocess"]), threshold, ckpt.get("score", "cosine"), device,
                    flip=run_flip(ckpt), calibration=calibration)


def run_flip(ckpt: dict) -> bool:
    """Whether the run evaluated (and calibrated its threshold) with mirrored images' embeddings added."""
    return bool(ckpt.get("config", {}).get("eval_flip", False))
