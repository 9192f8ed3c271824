"""BatchNorm over the global batch of a distributed run (--sync-bn).

On CUDA this is ``torch.nn.SyncBatchNorm``. PyTorch's SyncBatchNorm refuses CPU tensors, so on
CPU (gloo) ``AllReduceBatchNorm`` does the same computation with plain collectives: the forward
combines every process's (count, mean, M2) into the global mean and variance, the backward
all-reduces the two per-channel gradient sums that depend on them. Outputs, input gradients and
running statistics (unbiased variance, momentum or cumulative average) equal one BatchNorm over
the concatenated batch; weight and bias gradients are each process's share, which DDP then reduces.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function
from torch.nn.modules.batchnorm import _BatchNorm



def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


class _GlobalBatchNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        n_local = xf.numel() // xf.shape[1]
        # Sums accumulate in float64, as PyTorch's own CPU BatchNorm does (its acc_type is double).
        mean_local = xf.sum(dim=dims, dtype=torch.float64) / n_local
        m2_local = ((xf - mean_local.float().view(_channel_shape(x))) ** 2).sum(dim=dims, dtype=torch.float64)
        # Per-process (mean, M2, count), combined with Chan's parallel formula: no cancellation
        # of a sum of squares.
        mine = torch.cat([mean_local, m2_local, mean_local.new_tensor([n_local])])
        stats = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(stats, mine, group=group)
        stats = torch.stack(stats)
        c = x.shape[1]
        means, m2s, counts = stats[:, :c], stats[:, c : 2 * c], stats[:, 2 * c : 2 * c + 1]
        total = counts.sum()
        if total <= 1:
            raise ValueError(f"BatchNorm needs more than 1 value per channel when training, got {int(total)}")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = (m2 / (total - 1)).to(running_var.dtype)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        mean_f, invstd_f = mean.float().view(_channel_shape(x)), invstd.float().view(_channel_shape(x))
        xhat = (xf - mean_f) * invstd_f
        y = xhat
        if weight is not None:
            y = y * weight.float().view(_channel_shape(x)) + bias.float().view(_channel_shape(x))
        ctx.save_for_backward(x, weight, mean_f, invstd_f)
        ctx.total, ctx.group = float(total), group
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        dyf = dy.float()
        xhat = (x.float() - mean) * invstd
        sum_dy = dyf.sum(dim=dims, dtype=torch.float64)
        sum_dy_xhat = (dyf * xhat).sum(dim=dims, dtype=torch.float64)
        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The global mean and variance depend on every process's inputs, so the input gradient
            # needs the global sums of dy and dy*xhat. Each process holds dL_r/dy of its own loss;
            # their sum is the gradient of sum_r L_r, which DDP's average then divides by world.
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            c = x.shape[1]
            g_dy = (sums[:c] / ctx.total).float().view(_channel_shape(x))
            g_dy_xhat = (sums[c:] / ctx.total).float().view(_channel_shape(x))
            scale = invstd if weight is None else invstd * weight.float().view(_channel_shape(x))
            grad_x = (scale * (dyf - g_dy - xhat * g_dy_xhat)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics span every process of the default group (any device)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )
        if not synced:
            return super().forward(input)  # eval mode, or a single process: plain BatchNorm
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in _BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        return _GlobalBatchNorm.apply(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, self.process_group,
        )


def _replace(module: nn.Module, make) -> nn.Module:
    """``module`` with every BatchNorm swapped for ``make``'s (same parameters, buffers and mode)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, AllReduceBatchNorm)):
        new = make(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # the same Parameter objects: flags kept
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _replace(child, make))
    return module


def convert_to_sync_bn(model: nn.Module, device: torch.device) -> None:
    """Make the backbone's BatchNorm layers global in place: torch SyncBatchNorm on CUDA, AllReduceBatchNorm else.

    Each new layer takes the old one's parameters, buffers and mode, under the same name, so the
    model's eval-mode layers and state-dict keys are unchanged: checkpoints load into a model with
    plain BatchNorm.
    """
    make = nn.SyncBatchNorm if device.type == "cuda" else AllReduceBatchNorm
    model.backbone = _replace(model.backbone, make)
