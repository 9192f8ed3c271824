"""Process-group set-up from torchrun's environment, and the few helpers that depend on it.

Outside a process group (a plain ``python -m siamkit`` run) every helper is a no-op, so the
training loop calls them unconditionally and reads the same top to bottom with or without torchrun.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import SiamkitError, warn

T = TypeVar("T")

# Seconds a collective may wait for the slowest process before it fails (instead of hanging for
# PyTorch's default 30 minutes). Rank 0 alone writes checkpoints and plots while the others wait at
# the next collective, so this must exceed the slowest checkpoint write.
TIMEOUT_ENV = "SIAMKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0

# Signs of a broken process group in the text of the RuntimeError that gloo and NCCL raise.
_COMM_FAILURE_MARKERS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # In a process group: DDP and the collectives run, also for a world of one under torchrun
    # (torchrun --nproc-per-node 1 checks the NCCL/DDP path on a single GPU).
    enabled: bool = False
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it
    # Where the loop last checkpointed: named in the error when another process dies.
    checkpoint: Path | None = None
    checkpoint_step: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def describe(ctx: DistContext) -> str:
    """' x 2 processes (nccl)' for the start-up line; '' outside a process group."""
    if not ctx.enabled:
        return ""
    return f" x {ctx.world} process{'es' if ctx.world > 1 else ''} ({dist.get_backend()})"


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SiamkitError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def setup(device: str) -> DistContext:
    """Join the process group torchrun describes (env://); a plain run is a world of one.

    NCCL with one GPU per process (GPU = LOCAL_RANK) when CUDA is used, gloo on CPU. A group that
    already exists (a caller set it up) is joined, not re-created, and left for the caller to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        rank = dist.get_rank()
        return DistContext(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)), enabled=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # torchrun, or another env:// launcher
    if world <= 1 and not launched:
        return DistContext()
    if not launched:
        raise SiamkitError(
            "WORLD_SIZE is set but RANK or MASTER_ADDR is not; start distributed runs with torchrun "
            "(torchrun --nproc-per-node N -m siamkit train ...)"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise SiamkitError(
                f"process {local_rank} of this node needs GPU {local_rank}, but PyTorch sees "
                f"{torch.cuda.device_count()}; pass --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    except (dist.DistError, RuntimeError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise SiamkitError(
            f"could not join the process group at {where} ({str(e).splitlines()[0][:200]}); "
            "check the --rdzv-endpoint / --master-addr and that every node can reach it"
        ) from None
    return DistContext(rank=rank, world=world, local_rank=local_rank, enabled=True, owns_group=True)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_comm_failure(error: BaseException) -> bool:
    """Did a collective fail because another process died, hung or left?"""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _COMM_FAILURE_MARKERS)


def comm_failure_message(ctx: DistContext, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # gloo: "[.../pair.cc:545] Read error [host]:port: Connection reset by peer. This is typically..."
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]
    where = (
        f"; the last checkpoint {ctx.checkpoint} (step {ctx.checkpoint_step}) is intact: "
        "rerun the same command with --resume to continue"
        if ctx.checkpoint is not None
        else ""
    )
    return (
        f"process {ctx.rank} of {ctx.world} lost contact with the others ({first[:240]}): another process died, "
        f"hung past {TIMEOUT_ENV}={timeout_seconds():g}s or was stopped; see the torchrun summary for which{where}"
    )


def agree(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every process; if it raised SiamkitError on any, raise it on all.

    Checks that can fail on one process only (a run folder missing on one node) must not leave
    the others waiting forever at their next collective.
    """
    try:
        result, error = fn(), None
    except SiamkitError as e:
        result, error = None, str(e)
    if not ctx.enabled:
        if error is not None:
            raise SiamkitError(error)
        return result
    errors: list = [None] * ctx.world
    dist.all_gather_object(errors, error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        note = "" if len(failed) == ctx.world else f" (on process(es) {', '.join(map(str, failed))} of {ctx.world})"
        raise SiamkitError(errors[failed[0]] + note)
    return result


def from_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` run on the main process only; every process gets its result (a picklable object).

    An exception on the main process is sent along too and raised on every process, so that none is left
    waiting at the broadcast.
    """
    value: list = [None]
    if ctx.is_main:
        try:
            value = [(fn(), None)]
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            if not ctx.enabled:
                raise
            value = [(None, e)]
    if not ctx.enabled:
        return value[0][0]
    dist.broadcast_object_list(value, src=0)
    result, error = value[0]
    if error is not None:
        raise error
    return result


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_rank(ctx: DistContext, device: torch.device, *flags: torch.Tensor | bool) -> list[bool]:
    """Each flag, true if it is true on any process: one small all-reduce for all of them."""
    values = torch.stack([torch.as_tensor(f, device=device).reshape(()).to(torch.float32) for f in flags])
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def mean_over_ranks(ctx: DistContext, device: torch.device, values: Sequence[float]) -> list[float]:
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


@torch.no_grad()
def average_running_stats(ctx: DistContext, layers: Sequence[_BatchNorm]) -> None:
    """Set every process's BatchNorm running statistics to their mean over the processes.

    DDP runs with broadcast_buffers=False (see wrap_ddp), so each process updates its running
    statistics from its own shard; averaging them after every step keeps the replicas identical,
    so what rank 0 checkpoints is what every process evaluates. One all-reduce for all layers.
    """
    live = [m for m in layers if m.training and m.track_running_stats and m.running_mean is not None]
    if not ctx.enabled or not live:
        return
    tensors = [t for m in live for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel set up for Siamese steps.

    - no buffer broadcast at each forward (broadcast_buffers=False; forward_sync_buffers=False in
      newer PyTorch, which still syncs them once at start): with the per-branch BN policies DDP would
      otherwise overwrite the BatchNorm buffers in place at every one of the step's several
      forwards, while autograd still holds them ("modified by an inplace operation"); running
      stats are averaged after each step instead (average_running_stats).
    - static_graph=True: the step runs the backbone once per branch before one backward, and the
      classifier head is called outside DDP's forward; with a static graph DDP reduces each
      gradient once per backward whatever the number of forwards ("marked ready twice" otherwise).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Channels-last 1x1 convolutions have gradient strides that differ from DDP's flat bucket views
    # only in their (size-1) spatial dims: same memory order, so the warning DDP prints is spurious.
    warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        static_graph=True,
        gradient_as_bucket_view=True,
        **no_buffer_sync,
    )


def gather_with_grad(x: torch.Tensor, n_branches: int = 1) -> torch.Tensor:
    """All processes' rows of ``x`` (branch-major [b0; b1; ...] per process) as one branch-major tensor.

    Rows of each branch are ordered by rank, so the result is laid out like a single process's
    batch. Gradients flow back to the process that owns each row
    (torch.distributed.nn.functional.all_gather sums, over processes, the gradients of each slice).
    """
    import torch.distributed.nn.functional as dist_nn

    parts = []
    for branch in x.chunk(n_branches):
        if branch.requires_grad:
            with warnings.catch_warnings():
                # Newer PyTorch marks it deprecated in favour of a private module; it is the public,
                # long-stable autograd all-gather (gloo and NCCL alike).
                warnings.simplefilter("ignore", FutureWarning)
                pieces = dist_nn.all_gather(branch)
        else:
            pieces = [torch.empty_like(branch) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, branch.contiguous())
        parts.extend(pieces)
    return torch.cat(parts)


def plan(cfg, ctx: DistContext) -> tuple[bool, bool]:
    """(sync BatchNorm?, gather embeddings?) for this run; warns where a flag cannot have an effect."""
    sync_bn, gather = cfg.sync_bn, cfg.gather_embeddings
    say = warn if ctx.is_main else (lambda _msg: None)
    if ctx.world == 1 and (sync_bn or gather):
        flags = " and ".join(f for f, on in (("--sync-bn", sync_bn), ("--gather-embeddings", gather)) if on)
        say(f"{flags}: a single process already sees its whole batch, nothing to do; start with torchrun --nproc-per-node N to use them")
        return False, False
    if sync_bn and cfg.bn_policy == "frozen":
        say("--sync-bn has no effect with --bn-policy frozen: BatchNorm normalises with its stored statistics")
        sync_bn = False
    if gather and not cfg.pk_batches:
        # Explicit tuples: the loss is a mean over independent tuples, so the DDP average of the
        # per-process losses already has the gradient of the global one; gathering would only cost time.
        say("--gather-embeddings changes nothing for explicit pairs/triplets (no mining across tuples); "
            "it matters for PK batches with --mining")
        gather = False
    return sync_bn, gather
