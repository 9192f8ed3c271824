"""report.json / roc.png / scores.png writing and the human summary."""
from __future__ import annotations

import json

import numpy as np
import pytest

from siamkit.eval.report import format_summary, write_report
from siamkit.eval.verification import verification_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {
    "n_pairs", "n_genuine", "n_impostor", "roc_auc", "eer", "tar_at_far",
    "accuracy_mean", "accuracy_std", "threshold", "score", "thresholds_at_far",
}


@pytest.fixture
def evaluation():
    rng = np.random.default_rng(0)
    same = np.arange(400) % 2 == 0
    scores = np.where(same, rng.normal(0.6, 0.15, 400), rng.normal(0.2, 0.15, 400))
    folds = np.arange(400) % 10
    return verification_report(scores, same, folds, "cosine"), scores, same


def test_write_report_writes_three_files(tmp_path, evaluation):
    report, scores, same = evaluation
    out = tmp_path / "run" / "eval"  # created on demand
    write_report(report, scores, same, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "roc.png", "scores.png"]  # no temp files left
    loaded = json.loads((out / "report.json").read_text())
    assert set(loaded) == REPORT_KEYS
    assert loaded == report
    assert set(loaded["tar_at_far"]) == {"1e-1", "1e-2", "1e-3"}
    for name in ["roc.png", "scores.png"]:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_perfect_separation(tmp_path):
    # EER 0 and FAR 0 everywhere on the left: the log axis must still draw.
    scores, same = np.array([0.9, 0.8, 0.2, 0.1]), np.array([True, True, False, False])
    report = verification_report(scores, same, [0, 1, 0, 1], "euclidean")
    assert report["eer"] == 0.0
    write_report(report, scores, same, tmp_path)
    assert (tmp_path / "roc.png").read_bytes().startswith(PNG_SIGNATURE)


def test_format_summary(evaluation):
    report, _, _ = evaluation
    text = format_summary(report)
    lines = text.splitlines()
    assert 3 <= len(lines) <= 8
    assert "400 (200 genuine, 200 impostor)" in text
    assert f"{report['roc_auc']:.4f}" in text
    assert f"EER: {report['eer']:.2%}" in text
    assert f"{report['tar_at_far']['1e-3']:.2%} @ FAR 1e-3" in text
    assert f"{report['accuracy_mean']:.2%} ± {report['accuracy_std']:.2%}" in text
    assert f"{report['threshold']:.6g}" in text and "cosine" in text


def test_write_report_scores_that_nearly_coincide(tmp_path):
    # An untrained model can give every pair the same cosine up to float32 rounding: 50 bins must still fit.
    scores = np.float32(0.9999) + np.float32(1e-7) * np.array([0, 1, 0, 1, 1, 0], dtype=np.float32)
    same = np.array([True, False, True, False, True, False])
    report = verification_report(scores, same, [0, 1, 0, 1, 0, 1], "cosine")
    write_report(report, scores, same, tmp_path)
    assert (tmp_path / "scores.png").read_bytes().startswith(PNG_SIGNATURE)
