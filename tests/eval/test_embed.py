"""eval/embed.py: the views averaged into an embedding (--eval-flip, --eval-shifts), against an index-by-index path."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siamkit.data.pixels import Preprocess
from siamkit.data.transforms import normalize, shift_pixels
from siamkit.eval.embed import embed_images, view_embedding


class PixelsModel(torch.nn.Module):
    """embed(x) = the flattened pixels, L2-normalised for "l2": every output entry is one input value (scaled), so
    a view's embedding says exactly which pixels it read."""

    def __init__(self, activation: str = "l2"):
        super().__init__()
        self.spec = SimpleNamespace(embedding_activation=activation)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        e = x.flatten(1)
        return F.normalize(e, dim=1) if self.spec.embedding_activation == "l2" else e


def shifted_by_index(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Output pixel (i, j) reads input pixel (i + dy, j + dx), clamped to the image: the edges repeated."""
    h, w = x.shape[-2:]
    rows = np.clip(np.arange(h) + dy, 0, h - 1)
    cols = np.clip(np.arange(w) + dx, 0, w - 1)
    return x[..., rows[:, None], cols[None, :]]


def reference(x: np.ndarray, flip: bool, shift: int, l2: bool) -> np.ndarray:
    """The views' embeddings summed in float64: the image, four shifts by ``shift``, each with its mirror."""
    views = [x]
    if shift:
        views += [shifted_by_index(x, dx * shift, dy * shift) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    if flip:
        views += [v[..., ::-1] for v in views]
    flat = [v.reshape(len(x), -1) for v in views]
    if l2:
        total = sum(f / np.linalg.norm(f, axis=1, keepdims=True) for f in flat)
        return total / np.linalg.norm(total, axis=1, keepdims=True)
    return sum(flat) / len(flat)


# float32 against float64. "l2": a sum of at most 10 unit vectors has entries below 10, so its 9 additions err by at
# most 9 * 10 * 2^-24 ~ 5e-6 per entry, and dividing by its norm (about sqrt(10) for these nearly orthogonal random
# views) does not enlarge that; "none": averages of 10 values below 5 in magnitude (randn), 9 * 50 * 2^-24 / 10 ~ 3e-6.
ATOL = 1e-5


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("activation", ["l2", "none"])
def test_the_views_match_an_index_by_index_computation(flip, shift, activation):
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(shift))
    got = view_embedding(PixelsModel(activation), x, flip, shift)
    want = reference(x.double().numpy(), flip, shift, activation == "l2")
    assert got.shape == (3, 2 * 8 * 8) and np.abs(got.double().numpy() - want).max() < ATOL


def test_one_view_is_the_model_embedding_itself():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = PixelsModel()
    assert torch.equal(view_embedding(model, x, flip=False, shift=0), model.embed(x))


def test_each_shifted_view_reads_pixels_from_its_own_side():
    """A single bright pixel at (row 4, column 4) appears, in the 4 shifted views by 2, at (4, 2), (4, 6), (2, 4)
    and (6, 4): seen through the unnormalised sum of the views, its 5 positions hold the whole mass."""
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    total = view_embedding(PixelsModel("none"), x, flip=False, shift=2).view(9, 9) * 5  # the average * 5 views
    lit = {tuple(map(int, ij)) for ij in torch.nonzero(total)}
    assert lit == {(4, 4), (4, 2), (4, 6), (2, 4), (6, 4)} and torch.allclose(total[total != 0], torch.ones(5))


@pytest.mark.parametrize("size, pixels", [((32, 32), 2), ((64, 64), 4), ((112, 112), 7), ((48, 32), 2), ((8, 8), 1)])
def test_the_shift_is_a_sixteenth_of_the_shorter_side(size, pixels):
    assert shift_pixels(size) == pixels


def test_embed_images_applies_the_views_to_the_normalised_batch():
    pre = Preprocess(image_size=(32, 32), channels=3)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = PixelsModel()
    x = normalize(images, pre)
    plain = embed_images(model, images, pre, batch_size=2, flip=True)
    shifted = embed_images(model, images, pre, batch_size=2, flip=True, shifts=True)
    # Batches of 2 in channels-last memory against one contiguous batch of 5: the same values, which a kernel may
    # reduce in another order, hence ATOL.
    assert np.abs(shifted - view_embedding(model, x, True, 2).numpy()).max() < ATOL
    assert np.abs(plain - view_embedding(model, x, True, 0).numpy()).max() < ATOL
    assert np.abs(plain - shifted).max() > 100 * ATOL
