"""The raw-pixel baseline: what comparing the pixels of the same pairs already achieves.

Every report scores its pairs this way too, so a user sees at once whether training learned anything
the pixels did not already say: the run's own preprocessing (size, crop), one grey channel, each image
mean-centred and L2-normalised, cosine similarity.
"""
from __future__ import annotations

import numpy as np
import torch

from .verification import pair_scores, verification_report

# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses.
LUMA = (0.299, 0.587, 0.114)
# The baseline's part of report.json.
BASELINE_KEYS = ("roc_auc", "eer", "tar_at_far", "accuracy_mean", "accuracy_std")


def pixel_embeddings(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] -> [N, H*W] float64: grey, each row mean-centred and L2-normalised."""
    x = images.to(torch.float64)  # a cached data set's ImageRows reads its images here
    grey = x[:, 0] if x.shape[1] == 1 else torch.einsum("nchw,c->nhw", x[:, :3], torch.tensor(LUMA, dtype=x.dtype))
    flat = grey.reshape(len(grey), -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True)
    # A flat image (all pixels equal) has no direction: it stays zero and scores 0 against everything.
    return (flat / torch.where(norm > 0, norm, torch.ones_like(norm))).numpy()


# Float64 pixels of one chunk of pairs (each side, before the grey, centred and normalised copies): 32 MiB.
CHUNK_BYTES = 2**25


def pixel_scores(images: torch.Tensor, idx_a: np.ndarray, idx_b: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Cosine similarity of the pixel embeddings of each pair (indices into ``images``).

    ``chunk`` pairs at a time (default: as many as CHUNK_BYTES of float64 pixels hold), each side's images
    embedded for that chunk alone: memory follows the chunk, not the data set (an image in several chunks is
    embedded again; each row's embedding depends on that image alone).
    """
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (8 * int(np.prod(tuple(images.shape[1:])))))
    out = []
    for c in range(0, len(idx_a), chunk):
        a = pixel_embeddings(images[torch.from_numpy(np.asarray(idx_a[c : c + chunk], dtype=np.int64))])
        b = pixel_embeddings(images[torch.from_numpy(np.asarray(idx_b[c : c + chunk], dtype=np.int64))])
        out.append(pair_scores(a, b, "cosine"))
    return np.concatenate(out) if out else np.zeros(0)


def baseline_report(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict:
    """The metrics of report.json's ``baseline``, from pixel scores of the report's own pairs and folds."""
    full = verification_report(scores, same, folds, "cosine")
    return {key: full[key] for key in BASELINE_KEYS}
