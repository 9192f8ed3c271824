"""Heads on top of the backbone features: the embedding, and an optional identity classifier."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("l2", "sigmoid", "none")
CLASSIFIERS = ("softmax", "arcface", "cosface")


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


class SoftmaxClassifier(nn.Module):
    """Plain linear classifier: logits = W f + b."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(features)


class MarginClassifier(nn.Module):
    """ArcFace (s·cos(θ_y + m)) or CosFace (s·(cos θ_y − m)) on l2-normalised features and weights.

    The margin applies to the target class only, and only when labels are given (training).
    With ``subcenters`` K > 1 each class has K weight vectors and its cosine is the largest of theirs
    (sub-center ArcFace, Deng et al. 2020): a class's odd images may gather at a sub-center of their own
    instead of pulling the main one.
    """

    def __init__(self, in_features: int, n_classes: int, kind: str, scale: float = 30.0, margin: float = 0.3,
                 subcenters: int = 1):
        super().__init__()
        if kind not in ("arcface", "cosface"):
            raise ValueError(f"unknown margin classifier {kind!r}")
        # Rows k * n_classes + c: sub-center k of class c (with K = 1, the plain class weights).
        self.weight = nn.Parameter(torch.empty(subcenters * n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.kind, self.scale, self.margin, self.subcenters = kind, scale, margin, subcenters

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        if self.subcenters > 1:
            cos = cos.view(cos.shape[0], self.subcenters, -1).amax(dim=1)
        if labels is None:
            return self.scale * cos
        target = F.one_hot(labels, cos.shape[1]).to(torch.bool)
        if self.kind == "cosface":
            adjusted = cos - self.margin
        else:
            # cos(θ + m) = cos θ cos m − sin θ sin m; clamp keeps sqrt's gradient finite at |cos| = 1.
            sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
            adjusted = cos * math.cos(self.margin) - sin * math.sin(self.margin)
            # Past θ = π − m, cos(θ + m) stops decreasing; use the usual monotone extension (as in InsightFace).
            threshold = math.cos(math.pi - self.margin)
            adjusted = torch.where(cos > threshold, adjusted, cos - math.sin(math.pi - self.margin) * self.margin)
        return self.scale * torch.where(target, adjusted, cos)


def build_classifier(kind: str, in_features: int, n_classes: int, scale: float, margin: float,
                     subcenters: int = 1) -> nn.Module:
    if kind == "softmax":
        return SoftmaxClassifier(in_features, n_classes)
    return MarginClassifier(in_features, n_classes, kind, scale, margin, subcenters)
