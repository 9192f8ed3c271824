"""Verification metrics on pair similarity scores (higher = more likely the same identity)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from ..errors import SiamkitError

# The all-genuine-pairs protocol draws at most this many genuine pairs (and as many impostor pairs): a held-out set
# of 100,000 images of 50 each has 2.5 million genuine pairs; 50,000 measure a FAR of 1e-3 on 50 impostors.
MAX_GENUINE_PAIRS = 50_000
# (Declared here, in a module without torch, because the command line's parser needs it: see cli.TORCH_FREE_COMMANDS.)

# The FAR operating points that report.json lists, keyed as DESIGN.md spells them.
REPORT_FARS = {"1e-1": 1e-1, "1e-2": 1e-2, "1e-3": 1e-3}


def _check(scores, same) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    if scores.ndim != 1 or same.shape != scores.shape:
        raise ValueError(f"scores and same must be 1-D of equal length, got {scores.shape} and {same.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    return scores, same


def pair_scores(emb_a: np.ndarray, emb_b: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise similarity of two [N, D] embedding arrays: "cosine", or "euclidean" (= minus the distance)."""
    a, b = np.asarray(emb_a, dtype=np.float64), np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must be two [N, D] arrays of equal shape, got {a.shape} and {b.shape}")
    if metric == "cosine":
        # A zero vector has no direction: dividing by a tiny norm keeps it zero, so its score is 0.
        tiny = np.finfo(np.float64).tiny
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), tiny)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), tiny)
        return np.einsum("nd,nd->n", a, b)
    if metric == "euclidean":
        return -np.linalg.norm(a - b, axis=1)
    raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds), one point per distinct score, from the strictest threshold (inf) down."""
    scores, same = _check(scores, same)
    if same.all() or not same.any():
        raise ValueError("the ROC needs both genuine and impostor pairs")
    far, tar, thresholds = skm.roc_curve(same, scores, drop_intermediate=False)
    return far, tar, thresholds


def roc_auc(scores, same) -> float:
    scores, same = _check(scores, same)
    if same.all() or not same.any():
        raise ValueError("the ROC AUC needs both genuine and impostor pairs")
    return float(skm.roc_auc_score(same, scores))


def equal_error_rate(scores, same) -> tuple[float, float]:
    """(eer, threshold) where FAR = FRR on the ROC, interpolated linearly between the two bracketing points.

    The threshold is that of the bracketing ROC point with the smaller |FAR - FRR| (the lower threshold on a
    tie): a real score, so ``score >= threshold`` reproduces an actual operating point next to the EER.
    """
    scores, same = _check(scores, same)
    far, tar, thresholds = roc_curve(scores, same)
    n_genuine = int(np.count_nonzero(same))
    n_impostor = len(same) - n_genuine
    # FAR - FRR from integer counts, so that an exact crossing (e.g. 1/3 = 1 - 2/3) is exactly zero.
    fp, tp = np.rint(far * n_impostor).astype(np.int64), np.rint(tar * n_genuine).astype(np.int64)
    gap = (fp * n_genuine - (n_genuine - tp) * n_impostor) / (n_genuine * n_impostor)
    # gap is -1 at the first point (threshold inf), +1 at the last, and never decreases.
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0:
        return float(far[k]), float(thresholds[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    eer = far[k - 1] + t * (far[k] - far[k - 1])
    nearer = k - 1 if abs(gap[k - 1]) < abs(gap[k]) else k
    return float(eer), float(thresholds[nearer])


def tar_at_far(scores, same, far: float) -> float:
    """Highest TAR over thresholds whose FAR <= ``far``.

    FAR moves in steps of 1/n_impostor, so a target below that step gives the TAR at FAR = 0.
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    fars, tars, _ = roc_curve(scores, same)
    return float(tars[fars <= far].max())  # the first ROC point has FAR 0, so the set is never empty


def threshold_at_far(scores, same, far: float) -> dict:
    """The lowest threshold whose measured FAR is at most ``far``, with what it measured.

    Returns {"threshold", "far", "tar", "n_impostor", "supported"}. ``score >= threshold`` accepts at most
    ``far`` of the impostor pairs, also when scores tie: the threshold is always a score itself (every pair
    with that score is accepted and counted), or just above the highest score when no score qualifies.
    ``supported`` is False when there are fewer than 10 / far impostor pairs: a FAR that a handful of
    impostors decide is not a measurement.
    """
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must be in (0, 1], got {far}")
    scores, same = _check(scores, same)
    n_genuine = int(np.count_nonzero(same))
    n_impostor = len(same) - n_genuine
    if n_genuine == 0 or n_impostor == 0:
        raise ValueError("thresholds at a FAR need both genuine and impostor pairs")
    values, inverse = np.unique(scores, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Pairs accepted at threshold values[i]: every pair scoring >= values[i] (reverse cumulative counts).
    impostor_at = np.cumsum(np.bincount(inverse, weights=~same, minlength=len(values))[::-1])[::-1]
    genuine_at = np.cumsum(np.bincount(inverse, weights=same, minlength=len(values))[::-1])[::-1]
    # Whole counts against far * n: the relative slack absorbs far's decimal rounding (0.29 * 100 = 28.999...).
    allowed = far * n_impostor * (1 + 1e-12)
    ok = np.flatnonzero(impostor_at <= allowed)  # accepted counts fall as the threshold rises: a suffix
    if len(ok):
        i = int(ok[0])
        threshold, fp, tp = float(values[i]), int(impostor_at[i]), int(genuine_at[i])
    else:  # even the highest score lets in too many impostors: accept nothing
        threshold, fp, tp = float(np.nextafter(values[-1], np.inf)), 0, 0
    return {
        "threshold": threshold,
        "far": fp / n_impostor,
        "tar": tp / n_genuine,
        "n_impostor": n_impostor,
        "supported": n_impostor >= 10.0 / far * (1 - 1e-12),
    }


def best_threshold(scores, same) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of ``score >= threshold -> same``.

    Candidates: below the minimum, midpoints between consecutive distinct scores, above the maximum.
    Ties go to the smallest threshold.
    """
    scores, same = _check(scores, same)
    if len(scores) == 0:
        raise ValueError("no scores")
    values, inverse = np.unique(scores, return_inverse=True)
    genuine = np.bincount(inverse.reshape(-1), weights=same, minlength=len(values))
    impostor = np.bincount(inverse.reshape(-1), weights=~same, minlength=len(values))
    # Candidate c splits the distinct values into [0, c) -> "different" and [c, end) -> "same".
    below_genuine = np.concatenate([[0.0], np.cumsum(genuine)])
    below_impostor = np.concatenate([[0.0], np.cumsum(impostor)])
    correct = (genuine.sum() - below_genuine) + below_impostor
    c = int(np.argmax(correct))  # argmax takes the first maximum: the smallest threshold
    return _candidate(values, c), float(correct[c] / len(scores))


def _candidate(values: np.ndarray, c: int) -> float:
    """A threshold with values[c-1] < threshold <= values[c] (no lower or upper bound at the ends)."""
    if c == 0:
        low = values[0] - 1.0
        return float(low if low < values[0] else np.nextafter(values[0], -np.inf))
    if c == len(values):
        high = values[-1] + 1.0
        return float(high if high > values[-1] else np.nextafter(values[-1], np.inf))
    lo, hi = values[c - 1], values[c]
    mid = lo + (hi - lo) / 2
    return float(mid if mid > lo else hi)  # adjacent floats: the midpoint rounds onto lo


def kfold_accuracy(scores, same, folds) -> tuple[float, float, list[float]]:
    """(mean, std, per-fold accuracies): each fold is scored with best_threshold chosen on all other folds.

    std is the population std (ddof=0), as in the LFW protocol code. Folds are taken in ascending order.
    Note that a midpoint threshold makes this invariant under increasing transforms of the scores only when
    no test score falls strictly between two adjacent training scores.
    """
    scores, same = _check(scores, same)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"folds must match scores in shape, got {folds.shape} and {scores.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got {len(fold_ids)}")
    accuracies = []
    for k in fold_ids:
        test = folds == k
        threshold, _ = best_threshold(scores[~test], same[~test])
        accuracies.append(float(np.mean((scores[test] >= threshold) == same[test])))
    return float(np.mean(accuracies)), float(np.std(accuracies)), accuracies


def verification_report(scores, same, folds, score_name: str) -> dict:
    """The report.json dictionary of DESIGN.md, with plain Python numbers."""
    try:
        scores, same = _check(scores, same)
    except ValueError as e:
        raise SiamkitError(f"cannot evaluate: {e} (check the model's embeddings and the pairs)") from None
    n_genuine = int(same.sum())
    n_impostor = int(len(same) - n_genuine)
    if n_genuine == 0 or n_impostor == 0:
        raise SiamkitError(
            f"cannot evaluate verification with {n_genuine} genuine and {n_impostor} impostor pairs; "
            f"the pairs must include both (check the pairs file or use more identities)"
        )
    if len(np.unique(np.asarray(folds))) < 2:
        raise SiamkitError(
            "k-fold accuracy needs pairs in at least 2 folds; use a pairs file with several sets (pairs.txt has 10)"
        )
    eer, _ = equal_error_rate(scores, same)
    mean, std, _ = kfold_accuracy(scores, same, folds)
    threshold, _ = best_threshold(scores, same)
    return {
        "n_pairs": int(len(scores)),
        "n_genuine": n_genuine,
        "n_impostor": n_impostor,
        "roc_auc": roc_auc(scores, same),
        "eer": eer,
        "tar_at_far": {key: tar_at_far(scores, same, far) for key, far in REPORT_FARS.items()},
        "accuracy_mean": mean,
        "accuracy_std": std,
        "threshold": threshold,
        "score": str(score_name),
        "thresholds_at_far": {key: threshold_at_far(scores, same, far) for key, far in REPORT_FARS.items()},
    }
