"""1:N metrics (eval/identification.py) against brute-force loops and hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from siamkit.eval.identification import (average_precision, cmc, identification_report, identity_scores,
                                         open_set_rates, true_ranks)


def brute_rank(scores_row, true_id):
    """Position of true_id when identities are sorted by score (descending), ties by lower index."""
    order = sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], i))
    return order.index(true_id) + 1


def test_ranks_and_cmc_against_a_brute_force_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, (15, 8)).astype(float)  # small integers: many ties
        true = rng.integers(0, 8, 15)
        ranks = true_ranks(scores, true)
        assert list(ranks) == [brute_rank(list(s), t) for s, t in zip(scores, true)]
        curve = cmc(ranks, 8)
        for r in range(1, 9):
            assert curve[r - 1] == sum(brute_rank(list(s), t) <= r for s, t in zip(scores, true)) / 15
        assert curve[-1] == 1.0 and np.all(np.diff(curve) >= 0)


def test_identity_scores_take_each_identitys_best_image():
    image_scores = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.6, 0.7]])
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(identity_scores(image_scores, labels, 2), [[0.9, 0.3], [0.5, 0.7]])


def test_average_precision_by_hand():
    # Ranked: R N R N -> precisions at the relevant items 1/1 and 2/3 -> AP = (1 + 2/3) / 2.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.1, 0.9]), np.array([True, False])) == pytest.approx(0.5)


def test_open_set_rates_by_hand():
    # 10 unknown probes with best scores 0.0..0.9; known probes: best scores and whether rank 1 was right.
    known_best = np.array([0.95, 0.85, 0.5, 0.99])
    correct = np.array([True, True, True, False])
    rates = open_set_rates(known_best, correct, np.arange(10) / 10)
    # FAR 0.1 allows 1 of 10 unknowns: the lowest threshold is 0.85 (accepts unknown 0.9). DIR: correct and >= 0.85
    # = probes 0.95 and 0.85 -> 2 / 4 (the 0.99 one was identified wrongly).
    assert rates["1e-1"]["threshold"] == 0.85 and rates["1e-1"]["dir"] == 0.5 and rates["1e-1"]["far"] == 0.1
    assert not rates["1e-1"]["supported"]  # 10 unknowns: 10 / 0.1 = 100 needed
    # FAR 1e-2 allows none: threshold 0.95 (above the unknown 0.9) -> DIR 1/4.
    assert rates["1e-2"]["threshold"] == 0.95 and rates["1e-2"]["dir"] == 0.25
    # The smallest FAR 10 unknowns support is 10 / 10 = 1: everything is let in, DIR = 3/4.
    assert rates["1"]["supported"] and rates["1"]["dir"] == 0.75


def test_report_on_a_small_gallery():
    # Gallery: identity 0 images 0,1; identity 1 image 2. Probes: identity 0, identity 1, unknown.
    image_scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.6, 0.4], [0.3, 0.3, 0.2]])
    report = identification_report(image_scores, np.array([0, 0, 1]), 2, np.array([0, 1, -1]))
    # probe 0: id scores (0.9, 0.5) -> rank 1; probe 1: (0.6, 0.4) -> identity 0 ahead -> rank 2.
    assert report["rank1"] == 0.5 and report["cmc"] == [0.5, 1.0] and report["rank5"] == 1.0
    # AP probe 0: ranked images 0(R) 2 1(R) -> (1 + 2/3) / 2; probe 1: ranked 1 2(R) 0 -> 1/2.
    assert report["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert report["n_known_probes"] == 2 and report["n_unknown_probes"] == 1 and "open_set" in report
