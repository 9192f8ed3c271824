"""1:N identification metrics: CMC (rank-k accuracy), mAP, and open-set detection-and-identification rate.

Plain numpy on score matrices (higher = more alike), tested against brute-force loops. Probes whose
identity is enrolled are "known"; the others (identities left out of the gallery) are "unknown".
"""
from __future__ import annotations

import numpy as np

from .verification import REPORT_FARS, threshold_at_far

# What a baseline (the raw pixels, the off-the-shelf dlib model) reports of an identification.
IDENTIFICATION_BASELINE_KEYS = ("rank1", "rank5", "cmc", "map", "open_set")


def identity_scores(image_scores: np.ndarray, gallery_labels: np.ndarray, n_ids: int) -> np.ndarray:
    """[P, M] probe-vs-gallery-image scores -> [P, n_ids]: each identity's best image."""
    out = np.full((image_scores.shape[0], n_ids), -np.inf)
    for i in range(n_ids):
        cols = gallery_labels == i
        if cols.any():
            out[:, i] = image_scores[:, cols].max(axis=1)
    return out


def true_ranks(id_scores: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """1-based rank of each probe's true identity; ties go to the lower identity index, as in the top-k lists."""
    true_ids = np.asarray(true_ids)
    s_true = id_scores[np.arange(len(true_ids)), true_ids][:, None]
    cols = np.arange(id_scores.shape[1])[None, :]
    ahead = (id_scores > s_true) | ((id_scores == s_true) & (cols < true_ids[:, None]))
    return 1 + ahead.sum(axis=1)


def cmc(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """CMC curve: [max_rank] fraction of probes whose true identity is within the first r, r = 1..max_rank."""
    ranks = np.asarray(ranks)
    return np.array([np.mean(ranks <= r) for r in range(1, max_rank + 1)]) if len(ranks) else np.zeros(max_rank)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of one ranked list (descending score; ties in index order): mean precision at each relevant item."""
    order = np.argsort(-scores, kind="stable")
    hits = np.asarray(relevant)[order]
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def mean_average_precision(image_scores: np.ndarray, probe_ids: np.ndarray, gallery_labels: np.ndarray) -> float:
    """mAP over known probes, ranking gallery images; relevant = images of the probe's identity."""
    return float(np.mean([average_precision(s, gallery_labels == t) for s, t in zip(image_scores, probe_ids)]))


def open_set_rates(known_best: np.ndarray, known_correct: np.ndarray, unknown_best: np.ndarray) -> dict:
    """Per reported FAR: the threshold letting at most FAR of the unknown probes in (best score >= threshold),
    and the detection-and-identification rate DIR (known probes identified at rank 1 with score >= threshold).

    A FAR is "supported" when there are at least 10 / FAR unknown probes (as thresholds_at_far for pairs); the
    smallest supported FAR, 10 / unknown probes, is reported too when it is none of the usual ones.
    """
    known_best, known_correct = np.asarray(known_best, float), np.asarray(known_correct, bool)
    scores = np.concatenate([known_best, np.asarray(unknown_best, float)])
    known = np.r_[np.ones(len(known_best), bool), np.zeros(len(unknown_best), bool)]
    out = {}
    fars = dict(REPORT_FARS)
    smallest = 10.0 / max(len(unknown_best), 1)
    if smallest <= 1.0 and smallest not in fars.values():
        fars[f"{smallest:.3g}"] = smallest
    for key, far in fars.items():
        t = threshold_at_far(scores, known, far)
        out[key] = {"threshold": t["threshold"], "far": t["far"],
                    "dir": float(np.mean(known_correct & (known_best >= t["threshold"]))),
                    "n_unknown": t["n_impostor"], "supported": t["supported"]}
    return out


def identification_report(image_scores: np.ndarray, gallery_labels: np.ndarray, n_ids: int,
                          probe_ids: np.ndarray, max_rank: int = 10) -> dict:
    """rank-1/5 accuracy, CMC, mAP over known probes (probe_ids >= 0), and open-set rates if some are unknown (-1)."""
    probe_ids = np.asarray(probe_ids)
    known = probe_ids >= 0
    id_scores = identity_scores(image_scores, gallery_labels, n_ids)
    ranks = true_ranks(id_scores[known], probe_ids[known])
    curve = cmc(ranks, min(max_rank, n_ids))
    report = {
        "n_gallery_identities": int(n_ids), "n_gallery_images": int(len(gallery_labels)),
        "n_known_probes": int(known.sum()), "n_unknown_probes": int((~known).sum()),
        "rank1": float(curve[0]), "rank5": float(curve[min(5, len(curve)) - 1]),
        "cmc": [float(c) for c in curve],
        "map": mean_average_precision(image_scores[known], probe_ids[known], gallery_labels),
    }
    if (~known).any():
        best = id_scores.max(axis=1)
        report["open_set"] = open_set_rates(best[known], ranks == 1, best[~known])
    return report


def format_identification(report: dict, baseline: dict | None = None) -> str:
    lines = [
        f"gallery:   {report['n_gallery_identities']} identities ({report['n_gallery_images']} images); probes: "
        f"{report['n_known_probes']} known, {report['n_unknown_probes']} unknown",
        f"rank-1:    {report['rank1']:.2%}   rank-5: {report['rank5']:.2%}   mAP: {report['map']:.4f}",
    ]
    for key, o in report.get("open_set", {}).items():
        line = f"open set:  DIR {o['dir']:.2%} @ FAR {key} (threshold {o['threshold']:.6g}, {o['n_unknown']} unknown probes)"
        if not o["supported"]:
            line += f"; not supported: a FAR of {key} needs at least {10 / float(key):.0f} unknown probes"
        lines.append(line)
    if baseline is not None:
        lines.append(f"pixels:    rank-1 {baseline['rank1']:.2%}, rank-5 {baseline['rank5']:.2%}, mAP "
                     f"{baseline['map']:.4f} -> the model adds {100 * (report['rank1'] - baseline['rank1']):+.1f} "
                     f"rank-1 points")
    if "baseline_dlib" in report:  # the second baseline, as the verification summary's (eval/report.py)
        from .report import dlib_line

        b = report["baseline_dlib"]
        lines.append(dlib_line(b) if "skipped" in b else dlib_line(
            b, 100 * (report["rank1"] - b["rank1"]),
            f"rank-1 {b['rank1']:.2%}, rank-5 {b['rank5']:.2%}, mAP {b['map']:.4f}", "rank-1 points"))
    return "\n".join(lines)
