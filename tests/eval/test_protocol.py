"""The pair protocol at scale: images embedded batch by batch from the decoded cache, pairs capped and scored in
chunks, with the report of the in-memory path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from siamkit.data.cache import ImageRows
from siamkit.data.sources import IdentityDataset
from siamkit.data.transforms import Preprocess
from siamkit.eval import protocol
from siamkit.eval.protocol import evaluate
from siamkit.eval.report import format_summary

PRE = Preprocess(image_size=(6, 5), channels=1, mean=(0.5,), std=(0.5,))


class FixedProjection(nn.Module):
    """A fixed random linear map of the pixels: embeddings that depend on each image alone."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(30, 8, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 30, generator=torch.Generator().manual_seed(0)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def _data(images) -> IdentityDataset:
    labels = np.repeat(np.arange(12), 10)  # 12 people x 10 images: 540 genuine pairs
    return IdentityDataset(images=images, labels=labels, names=[str(i) for i in range(12)],
                           paths=[f"{i}.png" for i in range(120)])


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 1, 6, 5))
    noise = rng.integers(-60, 61, (120, 1, 6, 5))
    return np.clip(np.repeat(base, 10, axis=0) + noise, 0, 255).astype(np.uint8)


def test_cached_images_in_chunks_give_the_report_of_images_in_memory(images, monkeypatch):
    model = FixedProjection()
    ref = evaluate(model, PRE, _data(torch.from_numpy(images)), seed=1)
    monkeypatch.setattr(protocol, "SCORE_CHUNK", 7)  # pairs scored 7 at a time
    got = evaluate(model, PRE, _data(ImageRows(images.copy())), seed=1)
    # The same images, the same batches, each pair's score from its own two rows: equal, bit for bit.
    assert got.report == ref.report
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.baseline_scores, ref.baseline_scores)
    assert "pair_sampling" not in ref.report and ref.report["n_genuine"] == 540


def test_the_genuine_pairs_are_capped_seeded_and_the_report_says_so(images):
    model = FixedProjection()
    got = evaluate(model, PRE, _data(torch.from_numpy(images)), seed=2, max_genuine_pairs=100)
    assert got.report["n_genuine"] == 100 and got.report["n_impostor"] == 100
    assert got.report["pair_sampling"] == {"genuine_available": 540, "max_genuine_pairs": 100, "seed": 2}
    assert "genuine pairs drawn at random from 540 (--max-genuine-pairs 100, seed 2)" in format_summary(got.report)
    again = evaluate(model, PRE, _data(torch.from_numpy(images)), seed=2, max_genuine_pairs=100)
    assert again.report == got.report
