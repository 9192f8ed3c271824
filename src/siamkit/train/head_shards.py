"""A partial-FC run's checkpoints: the sharded head (models/partial_fc.py) gathered into the full classifier's layout
on save, and sliced back into this process's shard on resume.

A checkpoint of a partial-FC run is laid out exactly as a full classifier's: the model's ``classifier.weight`` holds
all C centres and the optimizer's state for it all C rows (Adam's moments), in the parameter order of a
full-classifier run. So it resumes with any number of processes (each takes its rows: re-sharding), with the full
classifier (--classifier-sample-rate 1), and `siamkit.load` reads it like any run. Saving is a collective: every
process sends its rows to the main process, which alone holds the whole head while it writes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..models.partial_fc import PartialFC, shard_bounds

HEAD_KEY = "classifier.weight"


def gather_to_main(shard: torch.Tensor, head: PartialFC) -> torch.Tensor | None:
    """The rows of every process's ``shard`` (shaped like the head's weight) in class order, on the main process;
    None on the others. Every process must call it."""
    if head.world == 1:
        return shard.detach().clone()
    width = -(-head.n_classes // head.world)  # gather takes equal sizes: shards are padded to the largest
    padded = shard.detach().new_zeros((width, *shard.shape[1:]))
    padded[: len(shard)] = shard.detach()
    parts = [torch.empty_like(padded) for _ in range(head.world)] if head.rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if head.rank != 0:
        return None
    rows = [shard_bounds(head.n_classes, head.world, r) for r in range(head.world)]
    return torch.cat([part[: end - first] for part, (first, end) in zip(parts, rows)])


def _head_index(optimizer: torch.optim.Optimizer, head: PartialFC) -> int:
    """The head's parameter's number in the optimizer's state dict (numbered in the order of its groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is head.weight)


def full_head_state(head: PartialFC, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """{"weight": [C, D] centres, "optimizer": the optimizer's state dict with the head's rows gathered}, on the
    main process (None on the others). Every process must call it."""
    weight = gather_to_main(head.weight, head)
    state = optimizer.state_dict()
    index = _head_index(optimizer, head)
    mine = state["state"].get(index, {})
    gathered = {k: gather_to_main(v, head) if _is_rows(v, head.weight.shape) else v for k, v in mine.items()}
    if head.rank != 0:
        return None
    if mine:
        state = {**state, "state": {**state["state"], index: gathered}}
    return {"weight": weight, "optimizer": state}


def with_full_head(checkpoint: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` (the run's state without the head) in a full classifier's layout: the centres in every model
    state dict, the class count in the model's spec, the gathered optimizer state."""
    out = dict(checkpoint)
    for key in ("model", "trained_model"):
        if key in out:
            out[key] = {**out[key], HEAD_KEY: full["weight"]}
    out["model_spec"] = {**out["model_spec"], "n_classes": int(full["weight"].shape[0])}
    out["optimizer"] = full["optimizer"]
    return out


def take_shard(head: PartialFC, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load this process's rows of a checkpoint's centres into ``head``; -> (the model state without the centres, the
    optimizer state with only this process's rows of the head's state), ready for load_state_dict."""
    model_state = dict(model_state)
    weight = model_state.pop(HEAD_KEY)
    full_shape = (head.n_classes, head.weight.shape[1])
    if tuple(weight.shape) != full_shape:
        raise ValueError(f"the checkpoint's classifier has shape {tuple(weight.shape)}, this run's {full_shape}")
    with torch.no_grad():
        head.weight.copy_(weight[head.first : head.end])
    index = _head_index(optimizer, head)
    saved = optimizer_state["state"].get(index)
    if saved is not None:
        # Cloned: a view would keep the whole checkpoint's tensor alive inside the optimizer.
        mine = {k: v[head.first : head.end].clone() if _is_rows(v, full_shape) else v for k, v in saved.items()}
        optimizer_state = {**optimizer_state, "state": {**optimizer_state["state"], index: mine}}
    return model_state, optimizer_state


def _is_rows(value: Any, shape: tuple[int, ...] | torch.Size) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shape)
