"""BatchNorm policies: how a shared backbone runs over the branches of a Siamese step.

| policy     | passes       | normalised with        | running stats after the step                 |
|------------|--------------|------------------------|----------------------------------------------|
| joint      | 1 (concat)   | all branches together  | one update from all branches                 |
| sequential | 1 per branch | each branch alone      | one update per branch, in order              |
| mean       | 1 per branch | each branch alone      | average of per-branch updates from one state |
| anchor     | 1 per branch | each branch alone      | one update, from branch 0 only               |
| frozen     | 1 (concat)   | stored running stats   | unchanged (BN layers stay in eval mode)      |

Each policy is a class in the ``POLICIES`` registry: whether it runs the backbone once over all
branches (``single_pass``), whether BatchNorm stays in eval mode (``eval_bn``), and, for per-branch
policies, how the branches' passes update the running statistics. Adding one is a class with
``@register_policy``; ``--bn-policy`` and the config checks read the registry.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import Registry

def bn_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def _updating(layers: list[_BatchNorm]) -> list[_BatchNorm]:
    """The layers whose running statistics a forward pass would change right now."""
    return [m for m in layers if m.training and m.track_running_stats]


@contextmanager
def no_running_stat_update(layers: list[_BatchNorm]) -> Iterator[None]:
    """Normalise with batch statistics but leave running stats and num_batches_tracked untouched.

    With track_running_stats off, a training-mode BatchNorm passes no running buffers to
    F.batch_norm, so it uses the batch's statistics and updates nothing.
    """
    changed = _updating(layers)
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


Run = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class BNPolicy:
    """How the backbone runs over a step's branches, and which running statistics it keeps."""

    name = ""
    single_pass = False  # one backbone pass over the concatenated branches
    eval_bn = False  # BatchNorm layers stay in eval mode (normalise with stored statistics)

    def run_branches(self, run: Run, branches: Sequence[torch.Tensor], layers: list[_BatchNorm]) -> list[tuple]:
        """Per-branch policies: the outputs of ``run`` for each branch, updating running stats as the policy says."""
        raise NotImplementedError


def _named_instance(name: str, cls: type[BNPolicy]) -> BNPolicy:
    cls.name = name
    return cls()


# --bn-policy NAME -> the policy (an instance of the registered class, which gets NAME as its ``name``).
POLICIES: Registry = Registry("--bn-policy", make=_named_instance)
# ``@register_policy("name")`` on a BNPolicy subclass: --bn-policy name.
register_policy = POLICIES.register


def get_policy(name: str) -> BNPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown BatchNorm policy {name!r}; choose one of {tuple(POLICIES)}") from None


@register_policy("joint")
class Joint(BNPolicy):
    single_pass = True


@register_policy("sequential")
class Sequential(BNPolicy):
    def run_branches(self, run, branches, layers):
        return [run(b) for b in branches]


@register_policy("mean")
class Mean(BNPolicy):
    def run_branches(self, run, branches, layers):
        # Each branch updates its own fresh copy of the starting statistics; the module's own buffers
        # are then set to the average. The copies, not the buffers, are what autograd saved, so
        # nothing it needs for backward is modified in place.
        live = _updating(layers)
        start = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in live]
        outs, ends = [], []
        for b in branches:
            for m, (mean, var, count) in zip(live, start):
                m.running_mean, m.running_var, m.num_batches_tracked = mean.clone(), var.clone(), count.clone()
            outs.append(run(b))
            ends.append([(m.running_mean, m.running_var) for m in live])
        with torch.no_grad():
            for j, (m, (mean, var, count)) in enumerate(zip(live, start)):
                mean.copy_(torch.stack([e[j][0] for e in ends]).mean(0))
                var.copy_(torch.stack([e[j][1] for e in ends]).mean(0))
                count.add_(1)
                m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        return outs


@register_policy("anchor")
class Anchor(BNPolicy):
    def run_branches(self, run, branches, layers):
        outs = [run(branches[0])]
        with no_running_stat_update(layers):
            outs += [run(b) for b in branches[1:]]
        return outs


@register_policy("frozen")
class Frozen(BNPolicy):
    single_pass, eval_bn = True, True


def forward_branches(
    run: Run, x: torch.Tensor, n_branches: int, policy: str, layers: list[_BatchNorm]
) -> tuple[torch.Tensor, ...]:
    """Run ``run`` (backbone + heads) over the branches of ``x`` under ``policy``.

    ``x`` holds the branches concatenated branch-major ([x_a; x_p; x_n]); so do the outputs.
    ``layers`` are the model's BatchNorm layers (frozen policy: already in eval mode, see SiameseNet.train).
    """
    chosen = get_policy(policy)
    if chosen.single_pass or n_branches == 1:
        return run(x)
    outs = chosen.run_branches(run, x.chunk(n_branches), layers)
    return tuple(torch.cat(parts) for parts in zip(*outs))
