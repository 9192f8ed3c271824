"""Verification protocol: which pairs to score, embed each image once, score, report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..data.pairs import folder_pairs, read_lfw_pairs
from ..data.sources import FOLDER, SOURCES, IdentityDataset, source_of
from ..data.transforms import Preprocess
from ..errors import SiamkitError
from .baseline import baseline_report, pixel_scores
from .embed import embed_images
from .verification import MAX_GENUINE_PAIRS, pair_scores, verification_report


@dataclass
class PairSet:
    idx_a: np.ndarray
    idx_b: np.ndarray
    same: np.ndarray
    fold: np.ndarray


# Pairs scored at once by the model: bounds the memory of scoring whatever the number of pairs.
SCORE_CHUNK = 8192


def pairs_for(ds: IdentityDataset, pairs_file: str | None, seed: int, max_genuine: int | None = MAX_GENUINE_PAIRS) -> PairSet:
    """Pairs of a pairs.txt file (folds = its sets), a validation set's own (a .bin: file order, contiguous folds), or
    all genuine (at most ``max_genuine``, drawn with ``seed``) + as many impostor pairs, 10 folds."""
    if ds.pairs is not None:
        if pairs_file is not None:
            raise SiamkitError(f"{ds.root} holds its own pairs; drop --pairs")
        return PairSet(*ds.pairs)
    if pairs_file is None:
        return PairSet(*folder_pairs(ds.labels, seed=seed, n_folds=10, max_genuine=max_genuine))
    if not ds.root or ds.root in SOURCES:
        raise SiamkitError("--pairs needs --data to be the folder the pairs file refers to")
    pairs = read_lfw_pairs(pairs_file, ds.root)
    index = {p: i for i, p in enumerate(ds.paths)}
    missing = sorted({p for pair in pairs for p in (pair.left, pair.right) if p not in index})
    if missing:
        raise SiamkitError(
            f"{len(missing)} image(s) named in {pairs_file} could not be read from {ds.root}, e.g. "
            f"{', '.join(missing[:3])}; fix or remove those pairs"
        )
    return PairSet(
        idx_a=np.array([index[p.left] for p in pairs]),
        idx_b=np.array([index[p.right] for p in pairs]),
        same=np.array([p.same for p in pairs], dtype=bool),
        fold=np.array([p.fold for p in pairs]),
    )


class Evaluation(NamedTuple):
    report: dict  # report.json, with the pixel baseline's metrics under "baseline"
    scores: np.ndarray  # the model's score of each pair
    same: np.ndarray  # whether each pair is genuine
    baseline_scores: np.ndarray  # the raw-pixel baseline's score of each pair


def evaluate(
    model: torch.nn.Module,
    pre: Preprocess,
    ds: IdentityDataset,
    *,
    pairs_file: str | None = None,
    score: str = "cosine",
    flip: bool = False,
    shifts: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch_size: int = 256,
    sharded: bool = False,
    max_genuine_pairs: int | None = MAX_GENUINE_PAIRS,
    baseline_dlib: bool = False,
) -> Evaluation:
    """The model's report on ``ds`` under the pair protocol, beside the raw-pixel baseline on the same pairs.

    Each image a pair uses is embedded once, batch by batch (a cached data set is read from its file batch by
    batch), and pairs are scored in chunks, so memory follows the batch and the number of pairs, which the
    all-genuine-pairs protocol caps at ``max_genuine_pairs`` genuine pairs (drawn with ``seed``; report.json's
    ``pair_sampling`` says so where it applied).

    ``sharded``: in a distributed run each process embeds a share of the images (see embed_images);
    every process gets the same report. ``baseline_dlib``: also the off-the-shelf dlib face model's metrics on the
    same pairs, under ``baseline_dlib`` (eval/dlib_baseline.py; skipped with the reason where it does not apply).
    """
    pairs = pairs_for(ds, pairs_file, seed, max_genuine_pairs)
    used = np.unique(np.concatenate([pairs.idx_a, pairs.idx_b]))
    emb = embed_images(model, ds.images[torch.from_numpy(used)], pre, device, batch_size, flip, sharded=sharded,
                       shifts=shifts)
    row = np.full(len(ds), -1, dtype=np.int64)
    row[used] = np.arange(len(used))
    scores = np.concatenate([
        pair_scores(emb[row[pairs.idx_a[c : c + SCORE_CHUNK]]], emb[row[pairs.idx_b[c : c + SCORE_CHUNK]]], score)
        for c in range(0, len(pairs.same), SCORE_CHUNK)
    ])
    report = verification_report(scores, pairs.same, pairs.fold, score)
    counts = np.bincount(ds.labels)
    available = int((counts * (counts - 1) // 2).sum())
    if pairs_file is None and ds.pairs is None and available > report["n_genuine"]:  # stated where the cap drew a sample
        report["pair_sampling"] = {"genuine_available": available, "max_genuine_pairs": max_genuine_pairs, "seed": seed}
    pixels = pixel_scores(ds.images, pairs.idx_a, pairs.idx_b)
    report["baseline"] = baseline_report(pixels, pairs.same, pairs.fold)
    if baseline_dlib and ds.root and ds.root not in SOURCES and source_of(ds.root) is not FOLDER:
        # a .rec or .bin (insightface's packs) holds aligned crops: no photos for dlib's model to cut its chips from
        report["baseline_dlib"] = {"skipped": f"{ds.root} holds aligned crops, not the photos dlib's model cuts its "
                                              f"chips from"}
    elif baseline_dlib:
        from .dlib_baseline import dlib_baseline

        report["baseline_dlib"] = dlib_baseline(ds, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold, device)
    return Evaluation(report, scores, pairs.same, pixels)
