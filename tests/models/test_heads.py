"""Embedding and classifier heads against their formulas, computed per element with math."""
from __future__ import annotations

import math

import pytest
import torch

from siamkit.errors import SiamkitError
from siamkit.models.heads import (CLASSIFIERS, ArcFace, CosFace, EmbeddingHead, MarginClassifier, SoftmaxClassifier,
                                   build_classifier)


def _cos(f: list[float], w: list[float]) -> float:
    dot = sum(a * b for a, b in zip(f, w))
    return dot / (math.sqrt(sum(a * a for a in f)) * math.sqrt(sum(b * b for b in w)))


def arcface_by_hand(features, weight, labels, s: float, m: float) -> list[list[float]]:
    """s·cos(θ_y + m) for the target while θ_y + m < π, else InsightFace's s·(cos θ_y − m·sin m); s·cos θ otherwise."""
    out = []
    for f, y in zip(features.tolist(), labels.tolist()):
        row = []
        for j, w in enumerate(weight.tolist()):
            c = _cos(f, w)
            if j == y:
                theta = math.acos(max(-1.0, min(1.0, c)))
                row.append(s * (math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)))
            else:
                row.append(s * c)
        out.append(row)
    return out


def cosface_by_hand(features, weight, labels, s: float, m: float) -> list[list[float]]:
    return [
        [s * (_cos(f, w) - (m if j == y else 0.0)) for j, w in enumerate(weight.tolist())]
        for f, y in zip(features.tolist(), labels.tolist())
    ]


def _features_near_targets(weight: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Features at every angle to their target: aligned, orthogonal-ish and nearly opposite rows."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.linspace(1.0, -1.0, len(labels))[:, None]
    return signs * weight[labels] * 2.0 + 0.15 * torch.randn(len(labels), weight.shape[1], generator=g, dtype=weight.dtype)


@pytest.mark.parametrize("margin", [0.3, 0.5])
def test_arcface_logits_match_the_formula(margin):
    torch.manual_seed(0)
    head = ArcFace(6, 5, scale=16.0, margin=margin).double()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    features = _features_near_targets(head.weight.detach(), labels, seed=1)
    got = head(features, labels)
    expected = torch.tensor(arcface_by_hand(features, head.weight.detach(), labels, 16.0, margin), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # the test covers both sides of θ + m = π
    thetas = [math.acos(_cos(f, head.weight[y].tolist())) for f, y in zip(features.tolist(), labels.tolist())]
    assert any(t + margin < math.pi for t in thetas) and any(t + margin >= math.pi for t in thetas)


def test_cosface_logits_match_the_formula():
    torch.manual_seed(1)
    head = CosFace(6, 5, scale=30.0, margin=0.35).double()
    labels = torch.tensor([4, 3, 2, 1, 0, 0, 1, 2])
    features = _features_near_targets(head.weight.detach(), labels, seed=2)
    expected = torch.tensor(cosface_by_hand(features, head.weight.detach(), labels, 30.0, 0.35), dtype=torch.float64)
    torch.testing.assert_close(head(features, labels), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_heads_without_labels_give_scaled_cosines(kind):
    torch.manual_seed(2)
    head = CLASSIFIERS[kind](4, 3, scale=10.0, margin=0.4).double()
    features = torch.randn(5, 4, dtype=torch.float64)
    expected = [[10.0 * _cos(f, w) for w in head.weight.tolist()] for f in features.tolist()]
    torch.testing.assert_close(head(features), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_arcface_gradient_is_finite_when_a_feature_equals_its_class_weight():
    torch.manual_seed(3)
    head = ArcFace(4, 3)
    features = head.weight.detach()[[0, 2]].clone().requires_grad_(True)
    head(features, torch.tensor([0, 2])).sum().backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.weight.grad).all()


def test_softmax_classifier_is_an_affine_map():
    torch.manual_seed(4)
    head = SoftmaxClassifier(3, 4).double()
    features = torch.randn(5, 3, dtype=torch.float64)
    w, b = head.fc.weight.tolist(), head.fc.bias.tolist()
    expected = [[sum(wi * fi for wi, fi in zip(w[j], f)) + b[j] for j in range(4)] for f in features.tolist()]
    got = head(features, torch.tensor([0, 1, 2, 3, 0]))  # labels do not change a softmax classifier
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_build_classifier_kinds():
    assert isinstance(build_classifier("softmax", 8, 3, 30.0, 0.3), SoftmaxClassifier)
    arc = build_classifier("arcface", 8, 3, 20.0, 0.4)
    assert isinstance(arc, ArcFace) and isinstance(arc, MarginClassifier) and (arc.scale, arc.margin) == (20.0, 0.4)
    assert isinstance(build_classifier("cosface", 8, 3, 30.0, 0.3), CosFace)
    with pytest.raises(SiamkitError, match="--classifier 'sphereface' is not known; choose one of: softmax, arcface, "
                                           "cosface"):
        build_classifier("sphereface", 8, 3, 30.0, 0.3)


def test_embedding_head_activations():
    torch.manual_seed(5)
    features = torch.randn(4, 6)
    l2, sig, raw = (EmbeddingHead(6, 3, a) for a in ("l2", "sigmoid", "none"))
    for h in (sig, raw):
        h.load_state_dict(l2.state_dict())
    z = raw(features)
    torch.testing.assert_close(z, features @ l2.fc.weight.t() + l2.fc.bias)
    torch.testing.assert_close(l2(features), z / z.norm(dim=1, keepdim=True))
    torch.testing.assert_close(sig(features), 1 / (1 + torch.exp(-z)))
    with pytest.raises(ValueError, match="unknown embedding activation"):
        EmbeddingHead(6, 3, "tanh")


@pytest.mark.parametrize("kind, by_hand", [("arcface", arcface_by_hand), ("cosface", cosface_by_hand)])
def test_subcenter_heads_score_each_class_by_its_closest_subcenter(kind, by_hand):
    """K sub-centers: a class's cosine is the largest of its K rows' (rows k * n_classes + c), margin on that one."""
    torch.manual_seed(4)
    k, n_classes = 3, 4
    head = CLASSIFIERS[kind](6, n_classes, scale=20.0, margin=0.3, subcenters=k).double()
    assert head.weight.shape == (k * n_classes, 6)
    w = head.weight.detach()
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    # each feature near one of its class's sub-centers (a different one per row), so the max picks it
    features = w[(torch.arange(8) % k) * n_classes + labels] * 2.0 + 0.1 * torch.randn(8, 6, dtype=torch.float64)
    # by hand: for each feature, the closest sub-center of every class, then the plain formula on those rows
    rows = []
    for f, y in zip(features, labels):
        best = [max(range(k), key=lambda s: _cos(f.tolist(), w[s * n_classes + c].tolist())) for c in range(n_classes)]
        chosen = torch.stack([w[best[c] * n_classes + c] for c in range(n_classes)])
        rows.append(by_hand(f[None], chosen, y[None], 20.0, 0.3)[0])
    torch.testing.assert_close(head(features, labels), torch.tensor(rows, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    # without labels: the scaled largest cosine of each class
    plain = [[20.0 * max(_cos(f, w[s * n_classes + c].tolist()) for s in range(k)) for c in range(n_classes)]
             for f in features.tolist()]
    torch.testing.assert_close(head(features), torch.tensor(plain, dtype=torch.float64), rtol=1e-9, atol=1e-9)
