"""The raw-pixel baseline against hand computations, and its place in every report."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from siamkit.data.sources import default_preprocess, load_folder
from siamkit.eval.baseline import BASELINE_KEYS, baseline_report, pixel_embeddings, pixel_scores
from siamkit.eval.protocol import evaluate
from siamkit.eval.report import format_summary
from siamkit.eval.verification import verification_report


def grey(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)[None]  # [1, H, W]


def test_cosine_of_mean_centred_pixels_by_hand():
    a = grey([0, 2], [4, 6])  # mean 3 -> (-3, -1, 1, 3), norm sqrt(20)
    b = grey([1, 1], [1, 5])  # mean 2 -> (-1, -1, -1, 3), norm sqrt(12)
    images = torch.stack([a, b])
    expected = (3 + 1 - 1 + 9) / math.sqrt(20 * 12)
    # Float64 throughout: the only error is rounding of a 4-term dot product, far below 1e-12.
    assert pixel_scores(images, np.array([0]), np.array([1]))[0] == pytest.approx(expected, abs=1e-12)
    assert pixel_scores(images, np.array([0]), np.array([0]))[0] == pytest.approx(1.0, abs=1e-12)


def test_rgb_is_compared_as_one_grey_channel_with_luma_weights():
    rgb = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    rgb[0, 0] = torch.tensor([[10, 20], [30, 200]])  # red only
    rgb[0, 2] = torch.tensor([[50, 0], [0, 0]])  # and a little blue
    by_hand = np.array([0.299 * 10 + 0.114 * 50, 0.299 * 20, 0.299 * 30, 0.299 * 200])
    by_hand = (by_hand - by_hand.mean()) / np.linalg.norm(by_hand - by_hand.mean())
    np.testing.assert_allclose(pixel_embeddings(rgb)[0], by_hand, rtol=0, atol=1e-12)


def test_a_flat_image_scores_zero_not_nan():
    images = torch.stack([grey([7, 7], [7, 7]), grey([0, 9], [3, 1])])
    assert pixel_scores(images, np.array([0]), np.array([1]))[0] == 0.0


def test_baseline_report_is_the_verification_report_of_pixel_scores():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (20, 1, 4, 4), dtype=np.uint8))
    idx_a, idx_b = np.arange(0, 20, 2), np.arange(1, 20, 2)
    same = np.arange(10) % 2 == 0
    folds = np.arange(10) % 5
    scores = pixel_scores(images, idx_a, idx_b)
    report = baseline_report(scores, same, folds)
    full = verification_report(scores, same, folds, "cosine")
    assert set(report) == set(BASELINE_KEYS) and all(report[k] == full[k] for k in BASELINE_KEYS)


def test_every_evaluation_reports_the_baseline_on_its_own_pairs(att_faces):
    """evaluate() scores the same pairs with pixels; an untrained model's report is beside it, and the summary says so."""
    from siamkit.models.siamese import ModelSpec, SiameseNet

    pre = default_preprocess("folder", image_size=(32, 32), grayscale=True)
    ds = load_folder(att_faces, pre).subset(np.arange(4))
    torch.manual_seed(0)
    model = SiameseNet(ModelSpec(backbone="mobilenet_v3_small", in_channels=1)).eval()
    result = evaluate(model, pre, ds, seed=0)
    assert len(result.baseline_scores) == result.report["n_pairs"] == len(result.scores)
    # The independent path: every pair's pixel score recomputed from the images one pair at a time.
    from siamkit.eval.protocol import pairs_for

    pairs = pairs_for(ds, None, seed=0)
    emb = pixel_embeddings(ds.images)
    np.testing.assert_allclose(result.baseline_scores, (emb[pairs.idx_a] * emb[pairs.idx_b]).sum(1), atol=1e-12)
    base = result.report["baseline"]
    line = format_summary(result.report).splitlines()[-1]
    gain = 100 * (result.report["accuracy_mean"] - base["accuracy_mean"])
    assert line == (
        f"pixels:    accuracy {base['accuracy_mean']:.1%} ± {base['accuracy_std']:.1%}, AUC {base['roc_auc']:.3f} "
        f"-> the model adds {gain:+.1f} points"
    )
    # AT&T faces of 4 people at 32x32: pixels separate them far better than chance.
    assert base["roc_auc"] > 0.7


def test_pixel_scores_in_chunks_equal_one_piece():
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (30, 3, 5, 4), dtype=np.uint8))
    idx_a, idx_b = rng.integers(0, 30, 50), rng.integers(0, 30, 50)
    whole = pixel_scores(images, idx_a, idx_b, chunk=50)
    # Each image's embedding depends on that image alone: chunks of 7 pairs (the last shorter) give the same bits.
    np.testing.assert_array_equal(pixel_scores(images, idx_a, idx_b, chunk=7), whole)
    np.testing.assert_array_equal(pixel_scores(images, idx_a, idx_b), whole)  # the default chunk holds all 50
    emb = pixel_embeddings(images)
    np.testing.assert_allclose(whole, (emb[idx_a] * emb[idx_b]).sum(1), atol=1e-12)
