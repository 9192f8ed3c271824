"""Embedding extraction: each image once, in batches, in eval mode."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import Preprocess, normalize


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    pre: Preprocess,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    flip: bool = False,
    channels_last: bool = True,
) -> np.ndarray:
    """uint8 images [N, C, H, W] -> float32 embeddings [N, D].

    ``flip`` adds the embedding of the mirrored image; l2 embeddings are then re-normalised,
    the others averaged.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    l2 = getattr(getattr(model, "spec", None), "embedding_activation", "l2") == "l2"
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True), pre, channels_last)
            e = model.embed(x).float()
            if flip:
                e = e + model.embed(x.flip(-1)).float()
                e = F.normalize(e, dim=1) if l2 else e / 2
            out.append(e.cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()
