"""The second baseline of a face report: the off-the-shelf dlib face model on the report's own pairs (or, for an
identification report, searching the same probes in the same gallery).

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
    used = np.unique(np.concatenate([idx_a, idx_b]))
    subset = IdentityDataset(ds.images[torch.from_numpy(used)], ds.labels[used], ds.names,
                             [ds.paths[i] for i in used], ds.root)
    got = dlib_embeddings(subset, device)
    if isinstance(got, str):
        return _skipped(got)
    emb, score, undetected = got
    row = np.full(len(ds), -1, dtype=np.int64)
    row[used] = np.arange(len(used))
    scores = pair_scores(emb[row[idx_a]], emb[row[idx_b]], score)
    full = verification_report(scores, same, folds, score)
    return {**{key: full[key] for key in BASELINE_KEYS}, "score": score, "n_images": int(len(used)),
            "n_without_detection": int(undetected)}


def dlib_identification_baseline(gallery: IdentityDataset, probes: IdentityDataset, probe_ids: np.ndarray,
                                 device: str | torch.device = "cpu") -> dict:
    """identification.json's ``baseline_dlib``: dlib's model searching the same probes in the same gallery
    (rank-1/5, CMC, mAP, open set), or {"skipped": why}."""
    from ..gallery import exact_scores
    from .identification import IDENTIFICATION_BASELINE_KEYS, identification_report

    got = [dlib_embeddings(part, device) for part in (gallery, probes)]
    if any(isinstance(g, str) for g in got):
        return _skipped(next(g for g in got if isinstance(g, str)))
    (g_emb, score, g_undetected), (p_emb, _, p_undetected) = got
    full = identification_report(exact_scores(p_emb, g_emb, score), gallery.labels, gallery.n_identities, probe_ids)
    return {**{key: full[key] for key in IDENTIFICATION_BASELINE_KEYS if key in full}, "score": score,
            "n_images": len(gallery) + len(probes), "n_without_detection": int(g_undetected + p_undetected)}


def dlib_embeddings(ds: IdentityDataset, device: str | torch.device = "cpu") -> tuple[np.ndarray, str, int] | str:
    """(dlib's model's embedding of each image of ``ds``, its score, how many images had no detected face), or
    why dlib's model does not apply to these images."""
    try:
        from ..faces.chip_data import dataset_chips
        from ..faces.detect import check_installed

        check_installed()
    except SiamkitError as e:
        return f"the align extra is not installed ({e})"
    chips = dataset_chips(ds)
    if isinstance(chips, str):
        return chips
    pixels, undetected = chips
    if len(ds) and undetected > (1 - MIN_DETECTED_SHARE) * len(ds):
        return f"no face detected in {undetected} of {len(ds)} images: not photos of faces"
    from ..models.zoo import builtin_network

    # Building the network draws its random initial weights (replaced by dlib's) from torch's global generator: fork
    # it, so that a training run's state after its held-out report, saved for --resume, is what it would be without.
    with torch.random.fork_rng(devices=[]):
        model, ckpt = builtin_network(BUILTIN)
    from ..data.pixels import Preprocess

    emb = embed_images(model, pixels, Preprocess.from_dict(ckpt["preprocess"]), device, batch_size=BATCH)
    return emb, ckpt["score"], undetected


def _skipped(reason: str) -> dict:
    info(f"second baseline (off-the-shelf dlib model) skipped: {reason}")
    return {"skipped": reason}
