"""Metric losses, online miners and the joint (metric + classification) loss.

Everything here is fixed-shape batched tensor code: mining is done with masks over the
B x B distance matrix, never with index lists whose size depends on the data, so that
``torch.compile`` keeps the whole step in one graph.

Every metric loss takes ``(embeddings [N, D], labels [N])``. For explicit tuples the rows are
branch-major: [anchors; seconds] for pairs, [anchors; positives; negatives] for triplets.

The registry ``METRIC_LOSSES`` maps (``--loss``, ``--mining``) to a class; each class declares how many
branches a batch's rows split into (1 = a PK batch that mines its own tuples) and its default margin.
Adding a loss is one class with ``@register_loss("name")``: the options, their help and the config
checks read the registry.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SiamkitError

_EPS = 1e-12  # keeps sqrt's gradient finite at distance 0


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance."""
    return torch.sqrt(((a - b) ** 2).sum(dim=1).clamp_min(_EPS))


def distance_matrix(x: torch.Tensor) -> torch.Tensor:
    """All pairwise Euclidean distances of the rows of x (B x B)."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    return torch.sqrt(d2.clamp_min(_EPS))


class MarginLoss(nn.Module):
    """Base of the metric losses: a margin, and how many branches a batch's rows are split into.

    ``n_branches`` 1 means a PK batch (P identities x K images, one branch) whose tuples the loss mines.
    """

    n_branches = 1
    default_margin = 0.2

    def __init__(self, margin: float | None = None):
        super().__init__()
        self.margin = self.default_margin if margin is None else margin


# (--loss, --mining) -> class. "none" mining = explicit tuples drawn by the sampler.
METRIC_LOSSES: dict[tuple[str, str], type[MarginLoss]] = {}


def register_loss(name: str, mining: str = "none") -> Callable[[type[MarginLoss]], type[MarginLoss]]:
    """Class decorator: make a MarginLoss available as ``--loss name [--mining mining]``."""

    def add(cls: type[MarginLoss]) -> type[MarginLoss]:
        if (mining == "none") != (cls.n_branches > 1):
            raise ValueError(f"{cls.__name__}: explicit tuples (mining 'none') have 2+ branches, mined PK batches 1")
        METRIC_LOSSES[(name, mining)] = cls
        return cls

    return add


def loss_names() -> tuple[str, ...]:
    return tuple(sorted({name for name, _ in METRIC_LOSSES}))


def mining_names() -> tuple[str, ...]:
    return ("none",) + tuple(sorted({m for _, m in METRIC_LOSSES if m != "none"}))


def minings_of(loss: str) -> tuple[str, ...]:
    """The --mining values a --loss offers on PK batches."""
    return tuple(m for name, m in METRIC_LOSSES if name == loss and m != "none")


def metric_loss_class(loss: str, mining: str) -> type[MarginLoss]:
    try:
        return METRIC_LOSSES[(loss, mining)]
    except KeyError:
        offered = ", ".join(m for name, m in METRIC_LOSSES if name == loss)
        raise SiamkitError(f"--loss {loss} has no --mining {mining}; choose one of: {offered}") from None


@register_loss("contrastive")
class ContrastiveLoss(MarginLoss):
    """Pairs: mean of y·d² + (1−y)·max(margin − d, 0)² (Hadsell, Chopra & LeCun 2006)."""

    n_branches = 2
    default_margin = 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, b = embeddings.chunk(2)
        la, lb = labels.chunk(2)
        same = (la == lb).to(a.dtype)
        d2 = ((a - b) ** 2).sum(dim=1)
        d = torch.sqrt(d2.clamp_min(_EPS))
        return (same * d2 + (1 - same) * F.relu(self.margin - d) ** 2).mean()


@register_loss("triplet")
class TripletLoss(MarginLoss):
    """Explicit triplets: mean of max(d(a, p) − d(a, n) + margin, 0)."""

    n_branches = 3

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, p, n = embeddings.chunk(3)
        return F.relu(euclidean(a, p) - euclidean(a, n) + self.margin).mean()


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive mask without the diagonal, negative mask) of a PK batch."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


@register_loss("triplet", mining="batch-hard")
class BatchHardTripletLoss(MarginLoss):
    """For each anchor: its farthest positive and nearest negative (Hermans et al. 2017)."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = distance_matrix(embeddings)
        pos, neg = _masks(labels)
        hardest_pos = torch.where(pos, d, torch.zeros_like(d)).amax(dim=1)
        hardest_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).amin(dim=1)
        valid = (pos.any(dim=1) & neg.any(dim=1)).to(d.dtype)
        losses = F.relu(hardest_pos - hardest_neg + self.margin) * valid
        return losses.sum() / valid.sum().clamp_min(1)


# Mining over [anchor, positive, negative] is computed for a chunk of anchors at a time, each chunk's temporaries
# at most this many elements (128 MiB of float32): at P x K = 1024 one [B, B, B] float tensor would be 4 GiB.
# Batches with B^3 below it are one chunk: the same graph as unchunked code.
CHUNK_ELEMENTS = 2**25


def _anchor_chunks(batch: int, chunk_elements: int) -> list[tuple[int, int]]:
    """[start, end) ranges of anchors whose [chunk, B, B] temporaries hold at most ``chunk_elements`` each."""
    step = max(1, chunk_elements // max(1, batch * batch))
    return [(s, min(batch, s + step)) for s in range(0, batch, step)]


@register_loss("triplet", mining="semi-hard")
class SemiHardTripletLoss(MarginLoss):
    """FaceNet's semi-hard negatives (Schroff et al. 2015), over every anchor-positive pair.

    For each (a, p): the nearest negative that is farther than p; if there is none, the farthest
    negative. The loss is the mean of max(d(a, p) − d(a, n) + margin, 0) over all (a, p).
    Anchors are mined in chunks (CHUNK_ELEMENTS); each anchor's choice depends on its own row alone, so the
    result is the same as in one piece.
    """

    chunk_elements = CHUNK_ELEMENTS

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = distance_matrix(embeddings)
        pos, neg = _masks(labels)
        farthest_neg = torch.where(neg, d, torch.full_like(d, -float("inf"))).amax(dim=1, keepdim=True)
        chosen = []
        for s, e in _anchor_chunks(len(d), self.chunk_elements):
            d_ap = d[s:e, :, None]  # [a, p, 1]
            d_an = d[s:e, None, :]  # [a, 1, n]
            semi = neg[s:e, None, :] & (d_an > d_ap)
            inf = torch.full_like(d_an.expand_as(semi), float("inf"))
            nearest_semi = torch.where(semi, d_an.expand_as(semi), inf).amin(dim=2)
            chosen.append(torch.where(semi.any(dim=2), nearest_semi, farthest_neg[s:e].expand_as(nearest_semi)))
        chosen = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
        valid = pos & neg.any(dim=1, keepdim=True)
        losses = torch.where(valid, F.relu(d - chosen + self.margin), torch.zeros_like(d))
        return losses.sum() / valid.sum().clamp_min(1)


@register_loss("triplet", mining="all")
class BatchAllTripletLoss(MarginLoss):
    """Every valid triplet of the batch; the mean over those with a positive loss (Hermans et al. 2017).

    Summed over chunks of anchors (CHUNK_ELEMENTS): the same terms, added in another order.
    """

    chunk_elements = CHUNK_ELEMENTS

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = distance_matrix(embeddings)
        pos, neg = _masks(labels)
        total, active = d.new_zeros(()), torch.zeros((), dtype=torch.long, device=d.device)
        for s, e in _anchor_chunks(len(d), self.chunk_elements):
            valid = pos[s:e, :, None] & neg[s:e, None, :]
            losses = F.relu(d[s:e, :, None] - d[s:e, None, :] + self.margin) * valid
            total = total + losses.sum()
            active = active + (losses > 0).sum()
        return total / active.clamp_min(1)


@register_loss("contrastive", mining="all")
class PairwiseContrastiveLoss(MarginLoss):
    """Contrastive loss over every pair of a PK batch: half the mean genuine term plus half the mean impostor term.

    That weighting matches explicit pairs drawn half genuine, half impostor.
    """

    default_margin = 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = distance_matrix(embeddings)
        pos, neg = _masks(labels)
        upper = torch.ones_like(pos).triu(diagonal=1)
        pos, neg = pos & upper, neg & upper
        genuine = torch.where(pos, d * d, torch.zeros_like(d)).sum() / pos.sum().clamp_min(1)
        impostor = torch.where(neg, F.relu(self.margin - d) ** 2, torch.zeros_like(d)).sum() / neg.sum().clamp_min(1)
        return 0.5 * (genuine + impostor)


def build_metric_loss(loss: str, mining: str, margin: float | None = None) -> MarginLoss:
    """The metric loss for a --loss / --mining combination (margin None = the loss's default)."""
    return metric_loss_class(loss, mining)(margin)


class JointLoss(nn.Module):
    """metric_weight × metric loss + weight × (mean over branches of the cross-entropy of each branch's logits).

    Branches have equal sizes, so the mean of per-branch mean cross-entropies is the mean over all rows.
    metric_weight 0 trains the classifier alone (margin-softmax training, as ArcFace does): the metric loss
    is then not computed, and its log column reads 0.
    """

    def __init__(self, metric: nn.Module, classification_weight: float = 0.0, metric_weight: float = 1.0):
        super().__init__()
        self.metric = metric
        self.classification_weight = classification_weight
        self.metric_weight = metric_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None,
        classification: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``classification``: the classification loss computed already (partial FC, models/partial_fc.py), in place
        of the cross-entropy of ``logits``."""
        if self.metric_weight:
            metric = self.metric(embeddings.float(), labels)
        else:
            metric = embeddings.new_zeros((), dtype=torch.float32)
        if (logits is None and classification is None) or self.classification_weight == 0:
            return {"loss": self.metric_weight * metric, "metric": metric}
        if classification is None:
            classification = F.cross_entropy(logits.float(), labels)
        return {
            "loss": self.metric_weight * metric + self.classification_weight * classification,
            "metric": metric,
            "classification": classification,
        }
