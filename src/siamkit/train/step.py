"""One optimisation step: the fused module from images to every loss term (one graph for torch.compile),
``Training`` (what a step updates: the model, optimizer, schedule; built by train/run.py) and
``optimisation_step``, which runs it with the finite check and the BatchNorm rollback."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..batchnorm import forward_branches
from ..config import TrainConfig
from ..losses import JointLoss
from ..models.partial_fc import PartialFC
from ..models.siamese import SiameseNet
from ..optimizers import OPTIMIZERS
from . import distributed
from .ema import WeightEMA

# (tensor of this process, n_branches) -> the same rows of every process, branch-major.
Gather = Callable[[torch.Tensor, int], torch.Tensor]


class TrainStep(nn.Module):
    """images [n_branches*B, C, H, W] + labels -> {"loss", "metric", ["classification"]}.

    With the joint (or frozen) BN policy the backbone runs once over all branches and both heads
    read that one pass: triplet + a classifier on each branch ("six networks") costs one forward.
    """

    def __init__(
        self, model: SiameseNet, loss: JointLoss, n_branches: int, runner: nn.Module | None = None,
        gather: Gather | None = None, partial_fc: PartialFC | None = None,
    ):
        super().__init__()
        self.model = model
        self.bn_layers = model.bn  # after any sync-BN conversion, which happens before the step is built
        self.loss = loss
        self.n_branches = n_branches
        # What runs the backbone: the model itself, or its DistributedDataParallel wrapper.
        self.runner = runner if runner is not None else model
        self.classify = model.classifier is not None and loss.classification_weight > 0
        # --gather-embeddings: the loss (and its mining) sees every process's rows.
        self.gather = gather
        # --classifier-sample-rate below 1: the sharded classifier, which gathers the rows itself and gives its loss
        self.partial_fc = partial_fc

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features, embeddings = forward_branches(
            self.runner, x, self.n_branches, self.model.spec.bn_policy, self.bn_layers
        )
        head_input = features if self.model.spec.classifier_input == "features" else embeddings
        logits = self.model.classify(head_input, labels) if self.classify else None
        classification = self.partial_fc(head_input, labels) if self.partial_fc is not None else None
        if self.gather is not None:
            # Every process computes the same global loss. The gather's backward sums over the
            # processes the gradient each one sends to a row, i.e. world x dL/d(row), and DDP then
            # averages parameter gradients over the world processes: the two factors cancel, so the
            # update equals one process's over the global batch, with no extra scaling. Logits are
            # gathered too, so the classification term is the same global mean on every process.
            embeddings = self.gather(embeddings, self.n_branches)
            labels = self.gather(labels, self.n_branches)
            logits = self.gather(logits, self.n_branches) if logits is not None else None
        return self.loss(embeddings, labels, logits, classification)


@dataclass
class Training:
    """The model and everything that updates it: what one optimisation step needs (train/step.py)."""

    cfg: TrainConfig
    device: torch.device
    ctx: distributed.DistContext
    model: SiameseNet
    step_module: TrainStep
    step_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # step_module, or compiled
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sync_bn: bool  # BatchNorm statistics are global already (no averaging of running stats after a step)
    # BatchNorm buffers, put back when a step is skipped (they change in the forward pass).
    buffers: list[torch.Tensor] = field(default_factory=list)
    # --cpu-tuning auto on CPU: {convolution shape key: kernel} (kernel_choice.py), kept in checkpoints
    conv_kernels: dict[str, str] = field(default_factory=dict)
    tuning_note: str = ""  # how many shapes took which kernel, and where the choices came from (the run's log)
    ema: WeightEMA | None = None  # --ema-decay: the averaged weights the run evaluates and saves (train/ema.py)
    # --classifier-sample-rate below 1: this process's shard of the classifier, outside the model and DDP; its
    # weight is the last of ``params`` (the optimizer's, as a full classifier's is: checkpoints share one layout)
    partial_fc: PartialFC | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The --optimizer of ``cfg`` over ``params`` (optimizers.py's registry: adam, adamw with fused kernels)."""
    return OPTIMIZERS.lookup(cfg.optimizer)(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def gradients_finite(params: list[nn.Parameter]) -> torch.Tensor:
    """True (a 0-d bool tensor) when no gradient entry is inf or NaN: the step's finite check.

    The sum of all entries is finite whenever every entry is (an inf or NaN entry makes any sum inf or
    NaN), and a sum reads each gradient once at memory speed: ResNet18's 11.7 M gradients in about 1 ms
    on two cores, where their largest absolute entry (get_total_norm with p=inf) took 16 ms, 3% of a
    64x64 step (benchmarks/profile_step.py). A sum can also overflow with every entry finite (entries
    near 1e38); only then is the exact check run, so the answer is always exact.
    """
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    finite = torch.isfinite(torch.stack([g.sum() for g in grads]).sum())
    if not finite:  # rare: an inf or NaN somewhere, or an overflowing sum of finite entries
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return finite


@dataclass
class StepResult:
    out: dict[str, torch.Tensor]  # the loss terms of the step
    skipped: bool  # the loss or a gradient was not finite on some process: no update, BatchNorm state put back
    stop: bool  # some process was asked to stop (SIGINT/SIGTERM): every process stops after this step


def optimisation_step(t: Training, x: torch.Tensor, y: torch.Tensor, stop_requested: bool = False) -> StepResult:
    """Forward, backward and update of one batch; a non-finite step changes nothing but the schedule."""
    # BatchNorm updates its running statistics in the forward pass, before the loss is known to be finite:
    # a skipped step puts them back, so a NaN batch cannot poison the statistics used at evaluation.
    saved_buffers = [b.detach().clone() for b in t.buffers]
    if t.partial_fc is not None:
        # The step's index seeds the negatives drawn: the schedule counts every step, skipped ones too, from 0, and
        # resumes with the run.
        t.partial_fc.step = t.scheduler.last_epoch
    amp = t.amp_dtype
    with torch.autocast(t.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = t.step_fn(x, y)
    loss = out["loss"]
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)
    finite = torch.isfinite(loss) & gradients_finite(t.params)
    # Decided together: a process skipping a step, or stopping on a signal, alone would leave the others
    # waiting at the next collective. One small all-reduce for both.
    bad, stop = distributed.any_rank(t.ctx, t.device, ~finite, stop_requested)
    skipped = bad and t.cfg.amp != "fp16"  # fp16: GradScaler skips the update and lowers its scale itself
    if skipped:
        with torch.no_grad():
            for b, saved in zip(t.buffers, saved_buffers):
                b.copy_(saved)
        t.optimizer.zero_grad(set_to_none=True)
    else:
        t.scaler.step(t.optimizer)
        t.scaler.update()
        if not t.sync_bn:
            distributed.average_running_stats(t.ctx, t.step_module.bn_layers)
    # The average follows the steps taken, and after the running statistics are made equal across processes.
    # With fp16, GradScaler skips exactly the steps whose gradients are not finite, which `bad` includes.
    if t.ema is not None and not bad:
        t.ema.update()
    if not bad:
        t.scheduler.step()
    else:
        # The schedule counts skipped steps too; torch warns when it moves before the optimizer's first step, which
        # is exactly the case of a skipped first step (a user's NaN batch), not a misuse. Filtered on bad steps
        # only: changing the warning filters makes Python show its once-per-place warnings again.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            t.scheduler.step()
    return StepResult(out, skipped, stop)
