"""The second baseline of a face report: the off-the-shelf dlib face model on the report's own pairs.

Beside the raw pixels (eval/baseline.py), ``baseline_dlib`` says what a free face model that the align extra
installs already achieves on the same pairs, so a user sees whether training was worth it (docs/face-model.md).
dlib's model cuts its own chip of each original image (faces/chip_data.py: photos and raw crops, the built-in faces
at their own size; a folder of dlib chips as it is); a folder of crops aligned with siamkit's 112 px template has no
originals to cut from, and is skipped with the reason. Images without a detected face get the chip of the whole
frame (as ``--undetected frame``), so the pairs stay the report's; their count is in the report. Chips are embedded
in batches of 32 under inference mode: the main job's report stays cheap.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.sources import IdentityDataset
from ..errors import SiamkitError, info
from .baseline import BASELINE_KEYS
from .embed import embed_images
from .verification import pair_scores, verification_report

BATCH = 32
BUILTIN = "dlib"
# Below this share of images with a detected face the data is taken for something other than faces.
MIN_DETECTED_SHARE = 0.5


def dlib_baseline(ds: IdentityDataset, idx_a: np.ndarray, idx_b: np.ndarray, same: np.ndarray, folds: np.ndarray,
                  device: str | torch.device = "cpu") -> dict:
    """report.json's ``baseline_dlib``: the metrics of dlib's model on the pairs, or {"skipped": why}."""
    try:
        from ..faces.chip_data import dataset_chips
        from ..faces.detect import check_installed

        check_installed()
    except SiamkitError as e:
        return _skipped(f"the align extra is not installed ({e})")
    used = np.unique(np.concatenate([idx_a, idx_b]))
    subset = IdentityDataset(ds.images[torch.from_numpy(used)], ds.labels[used], ds.names,
                             [ds.paths[i] for i in used], ds.root)
    chips = dataset_chips(subset)
    if isinstance(chips, str):
        return _skipped(chips)
    pixels, undetected = chips
    if len(used) and undetected > (1 - MIN_DETECTED_SHARE) * len(used):
        return _skipped(f"no face detected in {undetected} of {len(used)} images: not photos of faces")
    from ..models.zoo import builtin_network

    # Building the network draws its random initial weights (replaced by dlib's) from torch's global generator: fork
    # it, so that a training run's state after its held-out report, saved for --resume, is what it would be without.
    with torch.random.fork_rng(devices=[]):
        model, ckpt = builtin_network(BUILTIN)
    from ..data.pixels import Preprocess

    emb = embed_images(model, pixels, Preprocess.from_dict(ckpt["preprocess"]), device, batch_size=BATCH)
    row = np.full(len(ds), -1, dtype=np.int64)
    row[used] = np.arange(len(used))
    scores = pair_scores(emb[row[idx_a]], emb[row[idx_b]], ckpt["score"])
    full = verification_report(scores, same, folds, ckpt["score"])
    return {**{key: full[key] for key in BASELINE_KEYS}, "score": ckpt["score"], "n_images": int(len(used)),
            "n_without_detection": int(undetected)}


def _skipped(reason: str) -> dict:
    info(f"second baseline (off-the-shelf dlib model) skipped: {reason}")
    return {"skipped": reason}
