"""Partial FC: an ArcFace/CosFace classifier whose class centres are sharded over the processes, with a sampled
share of the negative centres in each step (An et al. 2022; insightface's arcface_torch partial_fc_v2).

Sharding: with C classes and N processes, process r holds the centres of classes [r·C//N, (r+1)·C//N)
(``shard_bounds``; shard sizes differ by at most one). The shard is a plain local parameter, never wrapped by DDP:
its gradient is exact on its own process and no all-reduce touches it.

One step (``PartialFC.forward``, the same on every process):
1. every process's rows and labels are gathered (all-gather), so each shard sees the global batch;
2. each shard keeps ``int(R x its centres)`` centres: every centre that is the label of a gathered row (all of
   them, even beyond that count), the rest drawn uniformly from its other centres by a generator seeded with
   (seed, step, rank): the same draws whenever the run (or its resumption) reaches that step;
3. the margin softmax over the kept centres of all shards: each row's largest logit (all-reduce MAX, a shift for
   stability only: log-sum-exp does not depend on it), its sum of exp (all-reduce SUM) and its target logit
   (all-reduce SUM; only the shard that owns the label contributes). The loss is the mean over the global batch.
At R = 1 nothing is dropped and the loss and gradients are the full classifier's (heads.py) on the global batch.

Gradients: every process computes the same loss from the reduced sums and holds the graph of its own terms only,
so the sums pass gradients through unchanged (``_SumOverRanks``); a row's gradient is the sum of what flows back
through every shard, reduced in the gather's backward (``_GatherRows``) and multiplied by N, because DDP averages
the backbone's gradients over the N processes: the average of N copies of N x (this process's rows' part) is
then the one-process gradient of the global batch's mean loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import SiamkitError
from .heads import CLASSIFIERS, MarginClassifier

# Centres are initialised block by block, each block from its own seeded generator: a class's starting centre is
# the same whatever the number of processes, and no process draws more than its own rows plus two partial blocks.
INIT_BLOCK = 4096


def shard_bounds(n_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[first, end) of the classes whose centres process ``rank`` of ``world`` holds."""
    return rank * n_classes // world, (rank + 1) * n_classes // world


def margin_head(kind: str) -> type[MarginClassifier]:
    """The --classifier class whose margin the sharded head applies (a margin head: ArcFace, CosFace, ...)."""
    head = CLASSIFIERS.lookup(kind)
    if not (isinstance(head, type) and issubclass(head, MarginClassifier)):
        margins = ", ".join(n for n, h in CLASSIFIERS.items() if isinstance(h, type) and issubclass(h, MarginClassifier))
        raise SiamkitError(f"--classifier-sample-rate below 1 (partial FC) needs a margin classifier ({margins}), "
                           f"not --classifier {kind}; pass --classifier cosface or arcface")
    return head


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM whose backward passes the gradient through unchanged: every process computes the same loss
    from the sum and holds the graph of its own term, whose gradient is the sum's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GatherRows(torch.autograd.Function):
    """Every process's rows in rank order (equal counts); backward: this process's rows' gradient summed over the
    processes (each holds the part that flows through its own shard), times the number of processes (see above)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.world, ctx.rows = dist.get_rank(), len(parts), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows] * ctx.world


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


class PartialFC(nn.Module):
    """This process's shard of a margin classifier's centres; ``forward(rows, labels)`` -> the global batch's mean
    margin-softmax loss over the sampled centres (module docstring). ``step``: the step being trained, which seeds
    the draw of negatives (set by the training step before each forward)."""

    def __init__(self, kind: str, in_features: int, n_classes: int, scale: float, margin: float, sample_rate: float,
                 seed: int, rank: int = 0, world: int = 1):
        super().__init__()
        if n_classes < world:
            raise SiamkitError(f"partial FC shards {n_classes} classes over {world} processes: it needs at least one "
                               f"class per process; use fewer processes or --classifier-sample-rate 1")
        self.margin_logit = margin_head(kind).margin_logit
        self.n_classes, self.scale, self.margin, self.sample_rate = n_classes, scale, margin, sample_rate
        self.seed, self.rank, self.world, self.step = seed, rank, world, 0
        self.first, self.end = shard_bounds(n_classes, world, rank)
        self.weight = nn.Parameter(self._initial_centres(in_features))
        self.n_sampled = min(self.rows, max(1, int(sample_rate * self.rows)))

    @property
    def rows(self) -> int:
        return self.end - self.first

    def _initial_centres(self, in_features: int) -> torch.Tensor:
        """Xavier-uniform over the whole [C, D] matrix (as heads.py's full classifier), drawn block by block."""
        bound = (6.0 / (self.n_classes + in_features)) ** 0.5
        out = torch.empty(self.rows, in_features)
        for block in range(self.first // INIT_BLOCK, -(-self.end // INIT_BLOCK)):
            lo, hi = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, self.n_classes)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            values = torch.rand(hi - lo, in_features, generator=g) * (2 * bound) - bound
            a, b = max(lo, self.first), min(hi, self.end)
            out[a - self.first : b - self.first] = values[a - lo : b - lo]
        return out

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """Sorted local indices of this step's centres: every label of ``labels`` this shard holds, plus random
        others up to ``n_sampled`` (seeded by (seed, step, rank))."""
        local = labels[(labels >= self.first) & (labels < self.end)] - self.first
        positives = torch.unique(local)  # sorted
        if self.n_sampled >= self.rows:
            return torch.arange(self.rows, device=labels.device)
        if len(positives) >= self.n_sampled:
            return positives
        rng = np.random.default_rng([self.seed, self.step, self.rank, 4])
        score = rng.random(self.rows)
        score[positives.cpu().numpy()] = 2.0  # above every draw in [0, 1): the positives are always kept
        keep = np.argpartition(-score, self.n_sampled - 1)[: self.n_sampled]
        return torch.from_numpy(np.sort(keep)).to(labels.device)

    def forward(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            rows, labels = _GatherRows.apply(rows), _gather_labels(labels)
        kept = self.sample(labels)
        centres = self.weight if len(kept) == self.rows else self.weight[kept]  # all kept: no copy of the shard
        cos = F.linear(F.normalize(rows, dim=1), F.normalize(centres, dim=1))
        cos = cos.to(torch.promote_types(cos.dtype, torch.float32))  # the softmax in float32 at least, as under --amp
        local = labels - self.first
        owned = (local >= 0) & (local < self.rows)
        column = torch.searchsorted(kept, local.clamp(0, self.rows - 1)).clamp(max=len(kept) - 1)
        target = owned[:, None] & (torch.arange(len(kept), device=cos.device)[None, :] == column[:, None])
        logits = self.scale * torch.where(target, self.margin_logit(cos, self.margin), cos)
        with torch.no_grad():
            peak = logits.amax(dim=1)
            if self.world > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        sums = torch.stack([torch.exp(logits - peak[:, None]).sum(dim=1),
                            torch.where(target, logits, torch.zeros_like(logits)).sum(dim=1)])
        if self.world > 1:
            sums = _SumOverRanks.apply(sums)
        return (torch.log(sums[0]) + peak - sums[1]).mean()

    def describe(self) -> str:
        """The run log's line."""
        return (f"partial FC: {self.rows:,} centres per process, {self.n_sampled:,} sampled per step "
                f"(--classifier-sample-rate {self.sample_rate:g} of {self.n_classes:,} classes over {self.world} "
                f"process{'es' if self.world > 1 else ''}; every class of the batch is among them)")
