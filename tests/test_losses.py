"""Metric losses, miners and the joint loss against explicit per-sample Python loops.

The miners return only a loss, so "they pick the triplets a brute-force loop picks" is checked twice:
the loss value, and its gradient with respect to every embedding (which is zero for any sample the
miner did not pick, and differs if any other triplet is picked), against the explicit TripletLoss
applied to the brute-force triplets.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siamkit.losses import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    ContrastiveLoss,
    JointLoss,
    PairwiseContrastiveLoss,
    SemiHardTripletLoss,
    TripletLoss,
    _anchor_chunks,
    build_metric_loss,
    distance_matrix,
)


def dist(x: np.ndarray, i: int, j: int) -> float:
    return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j])))


def pk_batch(p: int, k: int, dim: int, seed: int, singletons: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """l2-normalised float64 embeddings of a P x K batch, plus optional identities with one image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(p).repeat_interleave(k), torch.arange(p, p + singletons)])
    perm = torch.randperm(len(labels), generator=g)
    x = F.normalize(torch.randn(len(labels), dim, generator=g, dtype=torch.float64), dim=1)
    return x, labels[perm]


def value_and_grad(loss_fn, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x, labels)
    loss.backward()
    return float(loss.detach()), x.grad


def explicit_triplets(x: torch.Tensor, triplets: list[tuple[int, int, int]], margin: float) -> torch.Tensor:
    """Mean triplet loss of explicit index triplets, through the independent TripletLoss."""
    a, p, n = (torch.tensor(idx) for idx in zip(*triplets))
    return TripletLoss(margin)(torch.cat([x[a], x[p], x[n]]), torch.zeros(3 * len(triplets)))


# --------------------------------------------------------------------------- explicit tuples


def test_distance_matrix_is_every_pairwise_distance():
    x, _ = pk_batch(3, 3, 5, seed=0)
    d = distance_matrix(x)
    xn = x.numpy()
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                assert d[i, j].item() == pytest.approx(dist(xn, i, j), rel=1e-9)


@pytest.mark.parametrize("margin", [1.0, 1.5])
def test_contrastive_loss_equals_a_per_pair_loop(margin):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(8, 4, generator=g, dtype=torch.float64) * 0.4 for _ in range(2))
    la = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    lb = torch.tensor([0, 1, 9, 3, 9, 9, 6, 9])  # 4 genuine, 4 impostor pairs
    an, bn = a.numpy(), b.numpy()
    terms = []
    for i in range(8):
        d = math.sqrt(sum((an[i, k] - bn[i, k]) ** 2 for k in range(4)))
        terms.append(d * d if la[i] == lb[i] else max(margin - d, 0.0) ** 2)
    got = ContrastiveLoss(margin)(torch.cat([a, b]), torch.cat([la, lb]))
    assert got.item() == pytest.approx(sum(terms) / 8, rel=1e-12)
    assert any(0 < t for t, same in zip(terms, la == lb) if not same)  # some impostor inside the margin


def test_triplet_loss_equals_a_per_triplet_loop():
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    margin = 0.7
    an, pn, nn_ = a.numpy(), p.numpy(), n.numpy()
    terms = [
        max(math.dist(an[i], pn[i]) - math.dist(an[i], nn_[i]) + margin, 0.0) for i in range(6)
    ]
    got = TripletLoss(margin)(torch.cat([a, p, n]), torch.zeros(18))
    assert got.item() == pytest.approx(sum(terms) / 6, rel=1e-12)
    assert 0 < sum(t == 0 for t in terms) < 6  # both active and inactive triplets


# --------------------------------------------------------------------------- online mining on PK batches


def brute_batch_hard(x: np.ndarray, labels: list[int]) -> list[tuple[int, int, int]]:
    out = []
    for a in range(len(x)):
        positives = [p for p in range(len(x)) if p != a and labels[p] == labels[a]]
        negatives = [n for n in range(len(x)) if labels[n] != labels[a]]
        if not positives or not negatives:
            continue
        p = max(positives, key=lambda j: dist(x, a, j))
        n = min(negatives, key=lambda j: dist(x, a, j))
        out.append((a, p, n))
    return out


def brute_semi_hard(x: np.ndarray, labels: list[int]) -> tuple[list[tuple[int, int, int]], int]:
    """Every (a, p): the nearest negative farther than p, else the farthest negative. Also: how many fell back."""
    out, fallbacks = [], 0
    for a in range(len(x)):
        negatives = [n for n in range(len(x)) if labels[n] != labels[a]]
        if not negatives:
            continue
        for p in range(len(x)):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [n for n in negatives if dist(x, a, n) > dist(x, a, p)]
            if farther:
                out.append((a, p, min(farther, key=lambda j: dist(x, a, j))))
            else:
                fallbacks += 1
                out.append((a, p, max(negatives, key=lambda j: dist(x, a, j))))
    return out, fallbacks


@pytest.mark.parametrize("seed,singletons", [(0, 0), (1, 2), (2, 1)])
def test_batch_hard_picks_the_brute_force_triplets(seed, singletons):
    x, labels = pk_batch(4, 3, 3, seed, singletons)
    margin = 1.5  # large enough that every picked triplet is active, so the gradient names all of them
    triplets = brute_batch_hard(x.numpy(), labels.tolist())
    value, grad = value_and_grad(BatchHardTripletLoss(margin), x, labels)
    ref_value, ref_grad = value_and_grad(lambda e, _: explicit_triplets(e, triplets, margin), x, labels)
    assert value == pytest.approx(ref_value, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    # and with a small margin, where some picked triplets are inactive
    value = BatchHardTripletLoss(0.1)(x, labels).item()
    assert value == pytest.approx(explicit_triplets(x, triplets, 0.1).item(), rel=1e-10)


@pytest.mark.parametrize("seed,singletons", [(0, 0), (3, 2)])
def test_semi_hard_picks_the_brute_force_triplets(seed, singletons):
    x, labels = pk_batch(4, 4, 2, seed, singletons)  # 2-D embeddings: both the semi-hard and the fallback case occur
    triplets, fallbacks = brute_semi_hard(x.numpy(), labels.tolist())
    assert 0 < fallbacks < len(triplets)
    for margin in (2.5, 0.3):
        value, grad = value_and_grad(SemiHardTripletLoss(margin), x, labels)
        ref_value, ref_grad = value_and_grad(lambda e, _: explicit_triplets(e, triplets, margin), x, labels)
        assert value == pytest.approx(ref_value, rel=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("margin", [0.2, 0.8])
def test_batch_all_is_the_mean_over_active_brute_force_triplets(margin):
    x, labels = pk_batch(3, 3, 4, seed=4, singletons=1)
    xn, lab = x.numpy(), labels.tolist()
    active = []
    for a in range(len(x)):
        for p in range(len(x)):
            for n in range(len(x)):
                if p != a and lab[p] == lab[a] and lab[n] != lab[a]:
                    loss = dist(xn, a, p) - dist(xn, a, n) + margin
                    if loss > 0:
                        active.append(loss)
    assert active
    assert BatchAllTripletLoss(margin)(x, labels).item() == pytest.approx(sum(active) / len(active), rel=1e-10)


@pytest.mark.parametrize("margin", [0.8, 1.3])
def test_pairwise_contrastive_uses_every_pair_of_the_batch(margin):
    x, labels = pk_batch(3, 3, 4, seed=5, singletons=1)
    xn, lab = x.numpy(), labels.tolist()
    genuine, impostor = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            d = dist(xn, i, j)
            (genuine if lab[i] == lab[j] else impostor).append(d * d if lab[i] == lab[j] else max(margin - d, 0) ** 2)
    expected = 0.5 * (sum(genuine) / len(genuine) + sum(impostor) / len(impostor))
    assert len(genuine) == 9 and len(impostor) == len(x) * (len(x) - 1) // 2 - 9
    assert PairwiseContrastiveLoss(margin)(x, labels).item() == pytest.approx(expected, rel=1e-10)


def test_build_metric_loss_maps_options_to_losses():
    assert type(build_metric_loss("contrastive", "none", 1.0)) is ContrastiveLoss
    assert type(build_metric_loss("triplet", "none", 0.2)) is TripletLoss
    assert type(build_metric_loss("contrastive", "all", 1.0)) is PairwiseContrastiveLoss
    assert type(build_metric_loss("triplet", "batch-hard", 0.2)) is BatchHardTripletLoss
    assert type(build_metric_loss("triplet", "semi-hard", 0.2)) is SemiHardTripletLoss
    assert type(build_metric_loss("triplet", "all", 0.2)) is BatchAllTripletLoss
    assert build_metric_loss("triplet", "semi-hard", 0.35).margin == 0.35


# --------------------------------------------------------------------------- joint loss


def _cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of log(sum_j exp(z_j)) - z_y, in plain Python."""
    rows = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        top = max(z)
        rows.append(top + math.log(sum(math.exp(v - top) for v in z)) - z[y])
    return sum(rows) / len(rows)


@pytest.mark.parametrize("n_branches,weight", [(2, 1.0), (3, 1.0), (3, 0.25)])
def test_joint_loss_is_metric_plus_weighted_mean_of_per_branch_cross_entropies(n_branches, weight):
    g = torch.Generator().manual_seed(6)
    b, classes = 5, 7
    embeddings = F.normalize(torch.randn(n_branches * b, 4, generator=g), dim=1)
    labels = torch.randint(0, classes, (n_branches * b,), generator=g)
    logits = torch.randn(n_branches * b, classes, generator=g) * 3
    metric = ContrastiveLoss() if n_branches == 2 else TripletLoss()
    out = JointLoss(metric, weight)(embeddings, labels, logits)

    per_branch = [
        F.cross_entropy(lg, lb) for lg, lb in zip(logits.chunk(n_branches), labels.chunk(n_branches))
    ]
    by_hand = [_cross_entropy_by_hand(lg, lb) for lg, lb in zip(logits.chunk(n_branches), labels.chunk(n_branches))]
    for torch_ce, hand_ce in zip(per_branch, by_hand):
        assert torch_ce.item() == pytest.approx(hand_ce, rel=1e-5)
    expected_metric = metric(embeddings, labels).item()
    assert out["metric"].item() == pytest.approx(expected_metric, rel=1e-6)
    assert out["classification"].item() == pytest.approx(sum(by_hand) / n_branches, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_metric + weight * sum(by_hand) / n_branches, rel=1e-5)


def test_joint_loss_without_classifier_is_the_metric_loss():
    g = torch.Generator().manual_seed(7)
    embeddings, labels = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    metric = TripletLoss()(embeddings, labels)
    for out in (JointLoss(TripletLoss(), 0.0)(embeddings, labels, torch.randn(9, 3)),
                JointLoss(TripletLoss(), 1.0)(embeddings, labels, None)):
        assert set(out) == {"loss", "metric"}
        assert out["loss"].item() == pytest.approx(metric.item(), rel=1e-6)


def test_metric_weight_scales_the_metric_term_and_zero_trains_the_classifier_alone():
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(9, 4, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2] * 3)
    logits = torch.randn(9, 3, generator=g)
    full = JointLoss(TripletLoss(), 0.5)(embeddings, labels, logits)
    half = JointLoss(TripletLoss(), 0.5, metric_weight=0.5)(embeddings, labels, logits)
    alone = JointLoss(TripletLoss(), 0.5, metric_weight=0.0)(embeddings, labels, logits)
    ce = F.cross_entropy(logits, labels)
    assert half["loss"].item() == pytest.approx(0.5 * full["metric"].item() + 0.5 * ce.item(), rel=1e-6)
    assert alone["loss"].item() == pytest.approx(0.5 * ce.item(), rel=1e-6) and alone["metric"].item() == 0.0


# --------------------------------------------------------------------------- mining in chunks of anchors


@pytest.mark.parametrize("cls,chunk_anchors", [(SemiHardTripletLoss, 1), (SemiHardTripletLoss, 5),
                                               (BatchAllTripletLoss, 1), (BatchAllTripletLoss, 7)])
def test_mining_in_chunks_equals_one_piece(cls, chunk_anchors):
    x, labels = pk_batch(4, 4, 2, seed=6, singletons=2)  # B = 18: chunks of 1, 5 or 7 anchors, the last one shorter
    b = len(x)
    whole = cls(0.3)
    assert len(_anchor_chunks(b, whole.chunk_elements)) == 1  # the default: one piece at this size
    chunked = cls(0.3)
    chunked.chunk_elements = chunk_anchors * b * b  # anchors per chunk = chunk_elements // B^2
    assert len(_anchor_chunks(b, chunked.chunk_elements)) == -(-b // chunk_anchors)
    value, grad = value_and_grad(whole, x, labels)
    chunk_value, chunk_grad = value_and_grad(chunked, x, labels)
    if cls is SemiHardTripletLoss:
        # Each anchor's negative is chosen from its own row alone: the same elementwise ops, bit for bit.
        assert chunk_value == value
        assert torch.equal(chunk_grad, grad)
    else:
        # The same float64 terms summed in another order: the sums differ by at most B^3 roundings of 2^-53 relative.
        assert chunk_value == pytest.approx(value, rel=b**3 * 2**-52)
        torch.testing.assert_close(chunk_grad, grad, rtol=b**3 * 2**-52, atol=0)
    assert value > 0
