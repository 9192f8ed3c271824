"""Code that runs inside the 2 processes of test_partial_fc_ddp.py's gloo group: the sharded head against the full
classifier computed on one process (every process computes that reference itself, from the same seeded data)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from siamkit.models.heads import build_classifier
from siamkit.models.partial_fc import PartialFC, shard_bounds

U = torch.finfo(torch.float64).eps / 2  # float64's unit roundoff


def tolerance(n_classes: int, dim: int, scale: float) -> float:
    """Bound on the rounding difference between the two paths' loss and gradients, in float64.

    Both compute the same cosines (dot products of D terms: relative error <= D·u each, whatever the blocking) and
    the same log-sum-exp over C logits of magnitude <= s (1 + margin), summed in another order and shifted by
    another maximum (relative error <= C·u of the sum). The gradients are softmax minus one-hot, times s, carrying
    the same relative errors. 64 covers the few further operations per term.
    """
    return 64 * (n_classes + dim) * U * 2 * scale


def _data(seed: int, rows: int, dim: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64), torch.randint(n_classes, (rows,), generator=g)


def _mine(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = len(x) // world
    return x[rank * rows : (rank + 1) * rows]


def same_as_full_classifier(rank: int, world: int, kind: str) -> None:
    """R = 1: loss, gradients (centres and rows) and 3 SGD-momentum steps equal the full head's on one process."""
    n_classes, dim, scale, margin, per_process = 7, 5, 30.0, 0.3, 4  # 7 classes: shards of 3 and 4
    full = build_classifier(kind, dim, n_classes, scale, margin).double()
    with torch.no_grad():  # unit rows: the normalisation's Lipschitz constant stays 1 (see the steps' bound)
        full.weight.copy_(F.normalize(torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64), dim=1))
    head = PartialFC(kind, dim, n_classes, scale, margin, 1.0, seed=0, rank=rank, world=world).double()
    with torch.no_grad():
        head.weight.copy_(full.weight[head.first : head.end])
    tol = tolerance(n_classes, dim, scale)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in (full, head)]
    for step in range(3):
        x, y = _data(10 + step, per_process * world, dim, n_classes)
        x_full = x.clone().requires_grad_(True)
        loss_full = F.cross_entropy(full(x_full, y), y)
        x_mine = _mine(x, rank, world).clone().requires_grad_(True)
        loss = head(x_mine, _mine(y, rank, world))
        for opt in optimizers:
            opt.zero_grad()
        loss_full.backward()
        loss.backward()
        torch.testing.assert_close(loss, loss_full, rtol=0, atol=tol)
        torch.testing.assert_close(head.weight.grad, full.weight.grad[head.first : head.end], rtol=0, atol=tol)
        # The rows get N x their gradient, which DDP's average over the N processes' backbones takes back.
        torch.testing.assert_close(x_mine.grad / world, _mine(x_full.grad, rank, world), rtol=0, atol=tol)
        for opt in optimizers:
            opt.step()
        # Each step moves the weights by lr x the gradient's rounding (<= tol) and expands earlier differences by at
        # most 1 + lr·L, L <= 2 s^2 for unit rows (softmax's curvature is <= 1/2, times s twice, times the two
        # normalisations): at lr 0.01, s = 30, (1 + 18)^3 x 3 x 0.01 x tol over these 3 steps, with momentum's
        # sum of past steps bounded by 1 / (1 - 0.9) = 10.
        bound = 10 * 19 ** (step + 1) * (step + 1) * 0.01 * tol
        torch.testing.assert_close(head.weight.detach(), full.weight.detach()[head.first : head.end], rtol=0, atol=bound)


def sampled_checks(rank: int, world: int) -> None:
    """R < 1: every positive kept, the count, the seed's draws, and the loss = the full head's on the kept columns."""
    n_classes, dim, scale, margin, per_process = 40, 6, 16.0, 0.2, 4
    # 20 centres per shard, 10 drawn, about 4 of them positives: the other 6 of 16 leave the draw C(16, 6) = 8008 ways
    head = PartialFC("cosface", dim, n_classes, scale, margin, 0.5, seed=5, rank=rank, world=world).double()
    full = build_classifier("cosface", dim, n_classes, scale, margin).double()
    with torch.no_grad():  # the full head from every shard's initial centres
        parts = [torch.empty_like(head.weight) for _ in range(world)]
        dist.all_gather(parts, head.weight.detach())
        full.weight.copy_(torch.cat(parts))
    x, y = _data(3, per_process * world, dim, n_classes)
    draws = []
    for step in range(4):
        head.step = step
        kept = head.sample(y)
        positives = {int(c) - head.first for c in y if head.first <= c < head.end}
        assert positives <= set(kept.tolist()), (step, positives, kept)
        assert len(positives) < head.n_sampled == int(0.5 * head.rows) == len(kept)
        assert kept.tolist() == sorted(set(kept.tolist()))
        assert torch.equal(head.sample(y), kept)  # the same (seed, step, rank): the same draw
        other = PartialFC("cosface", dim, n_classes, scale, margin, 0.5, seed=6, rank=rank, world=world)
        other.step = step
        assert not torch.equal(other.sample(y), kept)  # another seed, another draw
        draws.append(kept.tolist())
    assert len({tuple(d) for d in draws}) == len(draws)  # each step its own draw
    head.step = 2
    kept_here = head.sample(y) + head.first
    columns = [None] * world
    dist.all_gather_object(columns, kept_here.tolist())
    columns = torch.tensor(sorted(c for part in columns for c in part))
    x_full = x.clone().requires_grad_(True)
    logits = full(x_full, y)[:, columns]
    loss_full = F.cross_entropy(logits, torch.searchsorted(columns, y))
    x_mine = _mine(x, rank, world).clone().requires_grad_(True)
    loss = head(x_mine, _mine(y, rank, world))
    loss_full.backward()
    loss.backward()
    tol = tolerance(n_classes, dim, scale)
    torch.testing.assert_close(loss, loss_full, rtol=0, atol=tol)
    torch.testing.assert_close(head.weight.grad, full.weight.grad[head.first : head.end], rtol=0, atol=tol)
    unkept = torch.ones(head.rows, dtype=torch.bool)
    unkept[kept_here - head.first] = False
    assert torch.count_nonzero(head.weight.grad[unkept]) == 0  # centres not drawn get no gradient
    torch.testing.assert_close(x_mine.grad / world, _mine(x_full.grad, rank, world), rtol=0, atol=tol)


def checkpoint_checks(rank: int, world: int) -> None:
    """The head and its Adam state gathered on save, and re-sharded for 1 and 3 processes: the same centres."""
    from siamkit.train.head_shards import full_head_state, take_shard

    n_classes, dim = 11, 4
    head = PartialFC("arcface", dim, n_classes, 10.0, 0.3, 0.5, seed=2, rank=rank, world=world)
    opt = torch.optim.Adam([head.weight], lr=0.1)
    x, y = _data(4, 3 * world, dim, n_classes)
    head(_mine(x, rank, world).float(), _mine(y, rank, world)).backward()
    opt.step()
    full = full_head_state(head, opt)
    moments = [torch.empty(-(-n_classes // world), dim) for _ in range(world)]
    mine = torch.zeros(-(-n_classes // world), dim)
    mine[: head.rows] = opt.state[head.weight]["exp_avg"]
    dist.all_gather(moments, mine)
    if rank != 0:
        assert full is None
        return
    expected = torch.cat([m[: e - s] for m, (s, e) in zip(moments, (shard_bounds(n_classes, world, r) for r in range(world)))])
    assert torch.equal(full["optimizer"]["state"][0]["exp_avg"], expected)
    assert full["weight"].shape == (n_classes, dim) and torch.equal(full["weight"][head.first : head.end], head.weight)
    for new_world in (1, 3):
        for new_rank in range(new_world):
            other = PartialFC("arcface", dim, n_classes, 10.0, 0.3, 0.5, seed=9, rank=new_rank, world=new_world)
            other_opt = torch.optim.Adam([other.weight], lr=0.1)
            _, state = take_shard(other, other_opt, {"classifier.weight": full["weight"]}, full["optimizer"])
            other_opt.load_state_dict(state)
            assert torch.equal(other.weight, full["weight"][other.first : other.end])
            assert torch.equal(other_opt.state[other.weight]["exp_avg"], expected[other.first : other.end])


def all_checks(rank: int, world: int, runs: list, record: str) -> None:
    """Every check of the module in one group (starting processes is the expensive part), then the training runs."""
    import _dist_workers

    for kind in ("cosface", "arcface"):
        same_as_full_classifier(rank, world, kind)
    sampled_checks(rank, world)
    checkpoint_checks(rank, world)
    Path(record, f"checks-rank{rank}.ok").write_text("ok")
    _dist_workers.train_runs(rank, world, runs, record)
