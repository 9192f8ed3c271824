"""threshold_at_far (eval/verification.py) on hand-made score sets: ties, too few impostors, and the report."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siamkit.eval.report import format_summary
from siamkit.eval.verification import threshold_at_far, verification_report


def scored(genuine, impostor):
    return np.array(genuine + impostor, dtype=float), np.array([True] * len(genuine) + [False] * len(impostor))


def test_threshold_at_far_by_hand():
    # 10 impostors 0.0..0.9, genuine 0.95, 0.85, 0.5. FAR 0.1 allows 1 impostor: the lowest threshold
    # accepting only one is the genuine 0.85 (accepts impostor 0.9, genuine 0.95 and 0.85): FAR 1/10, TAR 2/3.
    s, same = scored([0.95, 0.85, 0.5], [i / 10 for i in range(10)])
    t = threshold_at_far(s, same, 0.1)
    # 10 impostors cannot measure a FAR of 10% (that needs 10 / 0.1 = 100).
    assert t == {"threshold": 0.85, "far": 0.1, "tar": 2 / 3, "n_impostor": 10, "supported": False}
    # FAR 0.2 allows 2: threshold 0.8 accepts impostors .8 .9 and genuine .95 .85 -> TAR 2/3.
    t = threshold_at_far(s, same, 0.2)
    assert (t["threshold"], t["far"], t["tar"]) == (0.8, 0.2, 2 / 3)
    # FAR 0.05 allows 0 impostors: the lowest threshold above every impostor is the genuine 0.95.
    t = threshold_at_far(s, same, 0.05)
    assert (t["threshold"], t["far"], t["tar"]) == (0.95, 0.0, 1 / 3)


def test_ties_never_accept_more_than_the_stated_far():
    # Impostors 0.9, 0.9 (tied), 0.1 x 8; genuine 0.9 (tied with them), 0.5. FAR 0.1 allows one impostor,
    # but the two at 0.9 come together: any threshold <= 0.9 accepts both (FAR 0.2). So accept none:
    # the threshold is just above the highest score and the genuine 0.9 is rejected too.
    s, same = scored([0.9, 0.5], [0.9, 0.9] + [0.1] * 8)
    t = threshold_at_far(s, same, 0.1)
    assert t["threshold"] > 0.9 and t["far"] == 0.0 and t["tar"] == 0.0
    assert np.count_nonzero((s >= t["threshold"]) & ~same) == 0
    # FAR 0.2 admits both tied impostors, and the threshold can go down to the genuine 0.5 (the next
    # impostors are at 0.1): FAR 0.2, TAR 1.
    t = threshold_at_far(s, same, 0.2)
    assert (t["threshold"], t["far"], t["tar"]) == (0.5, 0.2, 1.0)
    # A tie below the top: impostors .8 .6 .6 .2 x 7, genuine .6; FAR 0.2 allows 2 impostors, but .6 accepts
    # .8 .6 .6 = 3: too many, so the threshold stays at .8 and the genuine .6, tied with two impostors, is rejected.
    s, same = scored([0.6], [0.8, 0.6, 0.6] + [0.2] * 7)
    t = threshold_at_far(s, same, 0.2)
    assert (t["threshold"], t["far"], t["tar"]) == (0.8, 0.1, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=40),
    st.lists(st.integers(0, 20), min_size=1, max_size=40),
    st.sampled_from([0.5, 0.25, 0.1, 0.01]),
)
def test_against_brute_force_over_every_threshold(genuine, impostor, far):
    """The lowest candidate threshold whose impostor acceptances stay within far (integer scores force ties)."""
    s, same = scored([float(g) for g in genuine], [float(i) for i in impostor])
    t = threshold_at_far(s, same, far)
    n_imp = len(impostor)
    accepted_imp = np.count_nonzero((s >= t["threshold"]) & ~same)
    assert accepted_imp <= far * n_imp + 1e-9  # never above the stated FAR
    assert t["far"] == accepted_imp / n_imp
    assert t["tar"] == np.count_nonzero((s >= t["threshold"]) & same) / len(genuine)
    # Brute force: every threshold a score (or above all) that keeps within far; the best TAR among them.
    candidates = [c for c in sorted(set(s)) if np.count_nonzero((s >= c) & ~same) <= far * n_imp + 1e-9]
    best_tar = max([np.count_nonzero((s >= c) & same) / len(genuine) for c in candidates], default=0.0)
    assert t["tar"] == best_tar
    if candidates:
        assert t["threshold"] == min(candidates)


def test_report_holds_thresholds_and_says_when_too_few_impostors():
    rng = np.random.default_rng(0)
    same = np.arange(900) % 2 == 0  # 450 impostor pairs: enough for 1e-1 (needs 100), not 1e-2 (1000) or 1e-3
    scores = np.where(same, rng.normal(0.6, 0.15, 900), rng.normal(0.2, 0.15, 900))
    report = verification_report(scores, same, np.arange(900) % 10, "cosine")
    at_far = report["thresholds_at_far"]
    assert list(at_far) == ["1e-1", "1e-2", "1e-3"]
    assert [at_far[k]["supported"] for k in at_far] == [True, False, False]
    for key, t in at_far.items():
        assert t == threshold_at_far(scores, same, float(key)) and t["n_impostor"] == 450
        assert t["far"] <= float(key)
        # The TAR at this threshold is report.json's TAR at that FAR (the best TAR within the FAR).
        assert t["tar"] == pytest.approx(report["tar_at_far"][key])
    text = format_summary(report)
    assert "FAR 1e-1:" in text and "FAR 1e-3:" in text
    assert "fewer than 10/FAR = 1000 impostor pairs: not a measurement" in text
    assert "fewer than 10/FAR = 10000 impostor pairs: not a measurement" in text
    assert "fewer than 10/FAR = 100 impostor" not in text


def test_bad_far_is_refused():
    s, same = scored([0.9], [0.1])
    for far in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="far must be in"):
            threshold_at_far(s, same, far)
