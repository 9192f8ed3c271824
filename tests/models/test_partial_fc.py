"""The sharded margin classifier (models/partial_fc.py) on one process: the full heads' loss and gradients at
R = 1, the full head restricted to the sampled centres below 1, its initial centres whatever the sharding, and
its one-line refusals. Across processes: tests/train/test_partial_fc_ddp.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from siamkit.config import TrainConfig
from siamkit.errors import SiamkitError
from siamkit.models.heads import build_classifier
from siamkit.models.partial_fc import PartialFC, shard_bounds

N_CLASSES, DIM, SCALE, MARGIN = 30, 8, 20.0, 0.3
# float64: the two paths compute the same cosines (D-term dot products, relative error <= D·u) and log-sum-exp over
# C logits of size <= s (1 + m) in another order (relative error <= C·u); 64 covers the few further operations.
TOL = 64 * (N_CLASSES + DIM) * (torch.finfo(torch.float64).eps / 2) * 2 * SCALE


def _pair(kind: str, rate: float) -> tuple[torch.nn.Module, PartialFC]:
    head = PartialFC(kind, DIM, N_CLASSES, SCALE, MARGIN, rate, seed=3).double()
    full = build_classifier(kind, DIM, N_CLASSES, SCALE, MARGIN).double()
    with torch.no_grad():
        full.weight.copy_(head.weight)
    return full, head


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, DIM, generator=g, dtype=torch.float64), torch.randint(N_CLASSES, (12,), generator=g)


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_rate_one_is_the_full_classifier(kind):
    full, head = _pair(kind, 1.0)
    x, y = _batch()
    x_full, x_head = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_full = F.cross_entropy(full(x_full, y), y)
    loss = head(x_head, y)
    loss_full.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_full, rtol=0, atol=TOL)
    torch.testing.assert_close(head.weight.grad, full.weight.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(x_head.grad, x_full.grad, rtol=0, atol=TOL)  # one process: no factor N


def test_below_one_is_the_full_classifier_over_the_sampled_centres():
    full, head = _pair("arcface", 0.5)
    x, y = _batch()
    head.step = 7
    kept = head.sample(y)
    assert set(y.tolist()) <= set(kept.tolist()) and len(kept) == 15 == head.n_sampled
    # The same draw for the same (seed, step); another step draws other negatives.
    assert torch.equal(head.sample(y), kept)
    head.step = 8
    assert not torch.equal(head.sample(y), kept)
    head.step = 7
    loss_full = F.cross_entropy(full(x, y)[:, kept], torch.searchsorted(kept, y))
    loss = head(x, y)
    loss_full.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_full, rtol=0, atol=TOL)
    torch.testing.assert_close(head.weight.grad, full.weight.grad, rtol=0, atol=TOL)
    dropped = torch.ones(N_CLASSES, dtype=torch.bool)
    dropped[kept] = False
    assert torch.count_nonzero(head.weight.grad[dropped]) == 0


def test_more_positives_than_the_quota_are_all_kept():
    head = PartialFC("cosface", DIM, N_CLASSES, SCALE, MARGIN, 0.1, seed=0)  # int(0.1 x 30) = 3 per step
    labels = torch.tensor([4, 9, 9, 17, 22, 29])
    assert head.sample(labels).tolist() == [4, 9, 17, 22, 29]


def test_initial_centres_do_not_depend_on_the_number_of_processes():
    n_classes = 10_000  # more than two initialisation blocks
    whole = PartialFC("cosface", 4, n_classes, SCALE, MARGIN, 0.5, seed=1).weight
    for world in (2, 3):
        shards = [PartialFC("cosface", 4, n_classes, SCALE, MARGIN, 0.5, seed=1, rank=r, world=world).weight
                  for r in range(world)]
        assert [len(s) for s in shards] == [e - f for f, e in (shard_bounds(n_classes, world, r) for r in range(world))]
        assert torch.equal(torch.cat(shards), whole)
    bound = (6 / (n_classes + 4)) ** 0.5  # xavier-uniform, as the full classifier's
    assert whole.abs().max() <= bound and whole.abs().max() > 0.99 * bound


def test_refusals_are_one_line():
    with pytest.raises(SiamkitError, match="needs a margin classifier .* not --classifier softmax"):
        TrainConfig(classifier="softmax", classifier_sample_rate=0.5).validate()
    with pytest.raises(SiamkitError, match="--subcenters"):
        TrainConfig(classifier="arcface", subcenters=3, classifier_sample_rate=0.5).validate()
    with pytest.raises(SiamkitError, match=r"share in \(0, 1\]"):
        TrainConfig(classifier="arcface", classifier_sample_rate=1.5).validate()
    with pytest.raises(SiamkitError, match="must be a positive number"):
        TrainConfig(classifier="arcface", classifier_sample_rate=0).validate()
    with pytest.raises(SiamkitError, match="at least one class per process"):
        PartialFC("cosface", DIM, 3, SCALE, MARGIN, 0.5, seed=0, rank=0, world=4)
    TrainConfig(classifier="softmax", classifier_sample_rate=0.5, classification_weight=0).validate()  # no classifier
