"""Heads on top of the backbone features: the embedding, and an optional identity classifier (a registry:
softmax, ArcFace, CosFace; sub-center versions of the margin heads with --subcenters K)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

ACTIVATIONS = ("l2", "sigmoid", "none")


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding, then l2-normalisation, a sigmoid, or nothing."""

    def __init__(self, in_features: int, dim: int, activation: str = "l2"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown embedding activation {activation!r}")
        self.fc = nn.Linear(in_features, dim)
        self.activation = activation

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.fc(features)
        if self.activation == "l2":
            return F.normalize(z, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(z)
        return z


# --classifier NAME -> a class built as cls(in_features, n_classes, scale, margin, subcenters).
# ``@register_classifier("name")`` on an nn.Module subclass whose forward(features, labels=None) gives logits (the
# margin, if any, applied only with labels: training) adds one; ``supports_subcenters`` says whether --subcenters
# applies to it.
CLASSIFIERS: Registry = Registry("--classifier")
register_classifier = CLASSIFIERS.register


@register_classifier("softmax")
class SoftmaxClassifier(nn.Module):
    """Plain linear classifier: logits = W f + b (--scale, --class-margin and --subcenters do not apply)."""

    supports_subcenters = False

    def __init__(self, in_features: int, n_classes: int, scale: float = 30.0, margin: float = 0.3,
                 subcenters: int = 1):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(features)


class MarginClassifier(nn.Module):
    """Base of the margin heads: s·cos on l2-normalised features and weights, with ``margin_logit`` (a subclass's)
    in place of the target class's cosine when labels are given (training).

    With ``subcenters`` K > 1 each class has K weight vectors and its cosine is the largest of theirs
    (sub-center ArcFace, Deng et al. 2020): a class's odd images may gather at a sub-center of their own
    instead of pulling the main one.
    """

    supports_subcenters = True

    def __init__(self, in_features: int, n_classes: int, scale: float = 30.0, margin: float = 0.3,
                 subcenters: int = 1):
        super().__init__()
        # Rows k * n_classes + c: sub-center k of class c (with K = 1, the plain class weights).
        self.weight = nn.Parameter(torch.empty(subcenters * n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin, self.subcenters = scale, margin, subcenters

    @staticmethod
    def margin_logit(cos: torch.Tensor, margin: float) -> torch.Tensor:
        """The target class's cosine with ``margin`` applied (before the scale); the sharded head
        (models/partial_fc.py) applies it too."""
        raise NotImplementedError

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.margin_logit(cos, self.margin)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        if self.subcenters > 1:
            cos = cos.view(cos.shape[0], self.subcenters, -1).amax(dim=1)
        if labels is None:
            return self.scale * cos
        target = F.one_hot(labels, cos.shape[1]).to(torch.bool)
        return self.scale * torch.where(target, self.target_logit(cos), cos)


@register_classifier("arcface")
class ArcFace(MarginClassifier):
    """ArcFace: s·cos(θ_y + m) for the target class (Deng et al. 2019)."""

    @staticmethod
    def margin_logit(cos: torch.Tensor, margin: float) -> torch.Tensor:
        # cos(θ + m) = cos θ cos m − sin θ sin m; clamp keeps sqrt's gradient finite at |cos| = 1.
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
        adjusted = cos * math.cos(margin) - sin * math.sin(margin)
        # Past θ = π − m, cos(θ + m) stops decreasing; use the usual monotone extension (as in InsightFace).
        threshold = math.cos(math.pi - margin)
        return torch.where(cos > threshold, adjusted, cos - math.sin(math.pi - margin) * margin)


@register_classifier("cosface")
class CosFace(MarginClassifier):
    """CosFace: s·(cos θ_y − m) for the target class (Wang et al. 2018)."""

    @staticmethod
    def margin_logit(cos: torch.Tensor, margin: float) -> torch.Tensor:
        return cos - margin


def build_classifier(kind: str, in_features: int, n_classes: int, scale: float, margin: float,
                     subcenters: int = 1) -> nn.Module:
    """The --classifier ``kind`` head, from the registry."""
    return CLASSIFIERS.lookup(kind)(in_features, n_classes, scale, margin, subcenters)
