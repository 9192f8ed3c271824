"""Verification metrics against hand-computed values and brute-force definitions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siamkit.errors import SiamkitError
from siamkit.eval import verification as v
from siamkit.eval.verification import (
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)


def scored(genuine, impostor):
    """(scores, same) with the genuine scores first."""
    return np.array(genuine + impostor, dtype=float), np.array([True] * len(genuine) + [False] * len(impostor))


# genuine 0.9 0.8 0.4, impostor 0.7 0.3 0.2. In descending order: .9G .8G .7I .4G .3I .2I.
# ROC points (threshold: FAR, TAR, FRR): inf: 0, 0, 1 | .9: 0, 1/3, 2/3 | .8: 0, 2/3, 1/3 | .7: 1/3, 2/3, 1/3
#                                        .4: 1/3, 1, 0 | .3: 2/3, 1, 0 | .2: 1, 1, 0
SMALL = scored([0.9, 0.8, 0.4], [0.7, 0.3, 0.2])


# ---------------------------------------------------------------- pair_scores


def test_pair_scores_cosine_by_hand():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 1.0], [-6.0, -8.0], [1.0, 2.0], [2.0, 2.0]])
    # [1,0].[1,1]/sqrt2 = 1/sqrt2; opposite directions = -1; a zero vector scores 0; same direction = 1.
    np.testing.assert_allclose(pair_scores(a, b, "cosine"), [1 / math.sqrt(2), -1.0, 0.0, 1.0])


def test_pair_scores_euclidean_is_minus_distance():
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    b = np.array([[3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(pair_scores(a, b, "euclidean"), [-5.0, 0.0])  # 3-4-5 triangle


def test_pair_scores_rejects_unknown_metric_and_shapes():
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        pair_scores(np.ones((2, 3)), np.ones((2, 3)), "dot")
    with pytest.raises(ValueError, match="equal shape"):
        pair_scores(np.ones((2, 3)), np.ones((3, 3)), "cosine")


# ---------------------------------------------------------------- ROC, AUC, EER, TAR@FAR by hand


def test_roc_curve_by_hand():
    far, tar, thresholds = roc_curve(*SMALL)
    np.testing.assert_allclose(far, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tar, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.8, 0.7, 0.4, 0.3, 0.2])


def test_roc_auc_by_hand():
    # Correctly ordered (genuine, impostor) pairs: .9 beats 3, .8 beats 3, .4 beats .3 and .2 -> 8 of 9.
    assert roc_auc(*SMALL) == pytest.approx(8 / 9)
    # A tie counts 1/2: genuine 0.5 vs impostors 0.5 and 0.1 -> (1/2 + 1) / 2 = 3/4.
    assert roc_auc(*scored([0.5], [0.5, 0.1])) == pytest.approx(0.75)


def test_eer_exact_crossing():
    # At threshold .7: FAR = 1/3 and FRR = 1 - 2/3 = 1/3.
    assert equal_error_rate(*SMALL) == (pytest.approx(1 / 3), 0.7)


def test_eer_interpolated_between_points():
    # genuine .9 .85 .2, impostor .8 .7 .6 .5 (3 genuine, 4 impostor). FAR - FRR at the points:
    #   .85: 0 - 1/3 = -1/3 | .8: 1/4 - 1/3 = -1/12 | .7: 1/2 - 1/3 = +1/6
    # Crossing between .8 and .7 at t = (1/12) / (1/12 + 1/6) = 1/3: FAR = 1/4 + (1/3)(1/4) = 1/3 = FRR.
    # The nearer point is .8 (|-1/12| < |1/6|).
    eer, threshold = equal_error_rate(*scored([0.9, 0.85, 0.2], [0.8, 0.7, 0.6, 0.5]))
    assert eer == pytest.approx(1 / 3) and threshold == 0.8


def test_eer_tie_between_points_takes_lower_threshold():
    # genuine .9 .4, impostor .7 .6 .1: FAR - FRR at .7 is 1/3 - 1/2 = -1/6, at .6 is 2/3 - 1/2 = +1/6.
    # Midway: EER = 1/3 + (1/2)(1/3) = 1/2; both points equally near -> the lower threshold .6.
    assert equal_error_rate(*scored([0.9, 0.4], [0.7, 0.6, 0.1])) == (pytest.approx(0.5), 0.6)


def test_eer_perfect_and_inverted():
    assert equal_error_rate(*scored([0.9, 0.8], [0.2, 0.1])) == (0.0, 0.8)  # FAR = FRR = 0 at .8
    assert equal_error_rate(*scored([0.1, 0.2], [0.8, 0.9]))[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "far, expected",
    [
        (0.0, 2 / 3),  # FAR 0 reached down to threshold .8 with TAR 2/3
        (0.1, 2 / 3),  # below one impostor step (1/3): still the TAR at FAR 0
        (1 / 3, 1.0),  # threshold .4: FAR 1/3, TAR 1
        (0.5, 1.0),
        (1.0, 1.0),
    ],
)
def test_tar_at_far_by_hand(far, expected):
    assert tar_at_far(*SMALL, far) == pytest.approx(expected)


def test_tar_at_far_rejects_out_of_range():
    with pytest.raises(ValueError, match="far must be in"):
        tar_at_far(*SMALL, 1.5)


def test_metrics_need_both_classes():
    with pytest.raises(ValueError, match="both genuine and impostor"):
        equal_error_rate([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="both genuine and impostor"):
        roc_auc([0.1, 0.2], [False, False])


# ---------------------------------------------------------------- best_threshold and k-fold by hand


def test_best_threshold_by_hand():
    # Ascending: .2I .3I .4G .7I .8G .9G. Correct counts of "score >= t -> same":
    #   below .2: 3 | .25: 4 | .35: 5 | .55: 4 | .75: 5 | .85: 4 | above .9: 3
    # Best 5/6 at .35 and .75; the tie goes to the smaller, .35.
    threshold, accuracy = best_threshold(*SMALL)
    assert threshold == pytest.approx(0.35) and accuracy == pytest.approx(5 / 6)


def test_best_threshold_extremes():
    # All genuine: every score counts as same below the minimum -> threshold under 1.0, accuracy 1.
    threshold, accuracy = best_threshold([1.0, 2.0], [True, True])
    assert threshold < 1.0 and accuracy == 1.0
    threshold, accuracy = best_threshold([1.0, 2.0], [False, False])
    assert threshold > 2.0 and accuracy == 1.0
    # Scores so large that +-1 is lost in rounding still get a threshold strictly outside.
    assert best_threshold([1e20], [False])[0] > 1e20
    # Adjacent floats: the midpoint rounds onto the lower one, so the upper one is used.
    lo = 1.0
    hi = np.nextafter(lo, 2.0)
    threshold, accuracy = best_threshold([lo, hi], [False, True])
    assert lo < threshold <= hi and accuracy == 1.0


# fold 0: .9G .1I | fold 1: .8G .3I | fold 2: .6G .7I
FOLD_SCORES = np.array([0.9, 0.1, 0.8, 0.3, 0.6, 0.7])
FOLD_SAME = np.array([True, False, True, False, True, False])
FOLD_IDS = np.array([0, 0, 1, 1, 2, 2])


def test_kfold_accuracy_by_hand(monkeypatch):
    # Fold 0 held out, train .3I .6G .7I .8G: candidates .45 and .75 both get 3/4 -> .45; test .9>=.45 G, .1 I: 1.
    # Fold 1 held out, train .1I .6G .7I .9G: .35 and .8 both get 3/4 -> .35; test .8 G, .3 I: 1.
    # Fold 2 held out, train .1I .3I .8G .9G: only .55 gets 4/4; test .6 G right, .7 >= .55 called G: 1/2.
    # mean 5/6; population std: deviations 1/6, 1/6, -1/3 -> var (1/36 + 1/36 + 4/36) / 3 = 1/18.
    chosen = []
    real = v.best_threshold

    def recording(scores, same):
        result = real(scores, same)
        chosen.append(result[0])
        return result

    monkeypatch.setattr(v, "best_threshold", recording)
    mean, std, per_fold = kfold_accuracy(FOLD_SCORES, FOLD_SAME, FOLD_IDS)
    assert chosen == pytest.approx([0.45, 0.35, 0.55])
    assert per_fold == pytest.approx([1.0, 1.0, 0.5])
    assert mean == pytest.approx(5 / 6) and std == pytest.approx(math.sqrt(1 / 18))


def test_kfold_needs_two_folds():
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy(FOLD_SCORES, FOLD_SAME, np.zeros(6, int))


# ---------------------------------------------------------------- report


def test_verification_report_by_hand():
    report = verification_report(FOLD_SCORES, FOLD_SAME, FOLD_IDS, "cosine")
    assert list(report) == [
        "n_pairs", "n_genuine", "n_impostor", "roc_auc", "eer", "tar_at_far",
        "accuracy_mean", "accuracy_std", "threshold", "score", "thresholds_at_far",
    ]
    # Descending: .9G .8G .7I .6G .3I .1I -- the same ranks as SMALL, so AUC 8/9, EER 1/3.
    # Best threshold on all pairs: ascending .1I .3I .6G .7I .8G .9G -> .45 and .75 both 5/6 -> .45.
    assert report["n_pairs"] == 6 and report["n_genuine"] == 3 and report["n_impostor"] == 3
    assert report["roc_auc"] == pytest.approx(8 / 9)
    assert report["eer"] == pytest.approx(1 / 3)
    assert report["tar_at_far"] == pytest.approx({"1e-1": 2 / 3, "1e-2": 2 / 3, "1e-3": 2 / 3})
    assert report["accuracy_mean"] == pytest.approx(5 / 6)
    assert report["accuracy_std"] == pytest.approx(math.sqrt(1 / 18))
    assert report["threshold"] == pytest.approx(0.45)
    assert report["score"] == "cosine"
    # 3 impostors: every reported FAR (< 1/3) allows none; the lowest threshold above the impostor .7 is the
    # genuine .8 (TAR 2/3), and 3 impostor pairs support none of these FARs.
    for key in ("1e-1", "1e-2", "1e-3"):
        assert report["thresholds_at_far"][key] == {"threshold": 0.8, "far": 0.0, "tar": 2 / 3, "n_impostor": 3,
                                                    "supported": False}
    json.dumps(report, allow_nan=False)  # plain JSON numbers only
    for key, value in report.items():
        if key not in ("score", "tar_at_far", "thresholds_at_far"):
            assert type(value) in (int, float), key


@pytest.mark.parametrize(
    "scores, same, folds, match",
    [
        ([0.1, 0.2], [True, True], [0, 1], "0 impostor pairs"),
        ([0.1, 0.2], [False, False], [0, 1], "0 genuine"),
        ([0.1, 0.2], [True, False], [0, 0], "at least 2 folds"),
        ([0.1, float("nan")], [True, False], [0, 1], "NaN"),
    ],
)
def test_verification_report_rejects_unusable_input(scores, same, folds, match):
    with pytest.raises(SiamkitError, match=match):
        verification_report(scores, same, folds, "cosine")


# ---------------------------------------------------------------- properties


@st.composite
def labelled_scores(draw, min_size=2, max_size=40, both_kinds=True):
    """Scores on a grid of quarters (ties likely, all exact in binary); by default both kinds of pair occur."""
    n = draw(st.integers(min_size, max_size))
    scores = np.array(draw(st.lists(st.integers(-20, 20), min_size=n, max_size=n)), dtype=float) / 4
    same = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if both_kinds:
        same[0], same[1] = True, False
    return scores, same


def brute_auc(scores, same):
    g, i = scores[same], scores[~same]
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in g for b in i])


def rates(scores, same, threshold):
    """(FAR, FRR) of the rule score >= threshold, counted directly."""
    accept = scores >= threshold
    return np.mean(accept[~same]), np.mean(~accept[same])


PROPERTY = settings(max_examples=100, deadline=None)


@PROPERTY
@given(labelled_scores())
def test_auc_in_unit_interval_and_equals_brute_force(data):
    scores, same = data
    auc = roc_auc(scores, same)
    assert 0.0 <= auc <= 1.0
    assert auc == pytest.approx(brute_auc(scores, same))


@PROPERTY
@given(labelled_scores())
def test_eer_lies_between_far_and_frr_at_its_threshold(data):
    scores, same = data
    eer, threshold = equal_error_rate(scores, same)
    assert 0.0 <= eer <= 1.0
    assert threshold in set(scores.tolist())  # a real score, never inf
    far, frr = rates(scores, same, threshold)
    assert min(far, frr) - 1e-12 <= eer <= max(far, frr) + 1e-12


@PROPERTY
@given(labelled_scores(), st.sampled_from([0.0, 1e-3, 0.05, 0.1, 0.25, 0.5, 1.0]))
def test_tar_at_far_equals_brute_force(data, target):
    scores, same = data
    # Every threshold worth trying is a score (or above all, accepting nothing).
    best = max(
        1.0 - frr for far, frr in (rates(scores, same, t) for t in [np.inf, *scores]) if far <= target
    )
    assert tar_at_far(scores, same, target) == pytest.approx(best)


@PROPERTY
@given(labelled_scores(min_size=1, both_kinds=False))
def test_best_threshold_equals_brute_force(data):
    scores, same = data
    values = sorted(set(scores.tolist()))
    candidates = [values[0] - 1] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1]
    accuracies = [np.mean((scores >= t) == same) for t in candidates]
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(max(accuracies))
    first_best = next(t for t, a in zip(candidates, accuracies) if a == max(accuracies))
    assert threshold == pytest.approx(first_best)  # ties -> the smallest threshold


TRANSFORMS = [lambda s: 3 * s + 1, np.exp, lambda s: s**3]


@PROPERTY
@given(labelled_scores(min_size=1, both_kinds=False), st.sampled_from(TRANSFORMS))
def test_best_threshold_accuracy_invariant_under_increasing_transform(data, f):
    scores, same = data
    assert best_threshold(f(scores), same)[1] == best_threshold(scores, same)[1]


@PROPERTY
@given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=8),
    st.integers(2, 5),
    st.data(),
    st.sampled_from(TRANSFORMS),
)
def test_kfold_accuracy_invariant_under_increasing_transform(values, n_folds, data, f):
    # Every fold holds the same score values (labels drawn per fold), so no held-out score falls strictly
    # between two training scores: the midpoint rule then picks the same split before and after f.
    scores = np.tile(np.array(values, dtype=float) / 4, n_folds)
    same = np.array(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))))
    folds = np.repeat(np.arange(n_folds), len(values))
    mean, std, per_fold = kfold_accuracy(scores, same, folds)
    mean_f, std_f, per_fold_f = kfold_accuracy(f(scores), same, folds)
    assert per_fold_f == per_fold and (mean_f, std_f) == (mean, std)
    assert all(0.0 <= a <= 1.0 for a in per_fold)
