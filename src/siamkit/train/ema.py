"""An exponential moving average (EMA) of the model's weights: what a run evaluates and ships with --ema-decay D.

After every optimizer step that was taken, each floating-point parameter and buffer (BatchNorm running
statistics included) moves towards the trained model's: ema <- d * ema + (1 - d) * live; integer buffers
(BatchNorm's num_batches_tracked) are copied. The average lives in float32 (float64 for a float64 model)
on the training device, outside autograd. The classification head is left out: verification reads the
embedding alone, so a classifier's average would be computed and never used (the checkpoint keeps the
trained classifier).

In a distributed run every process holds the same parameters after the gradient all-reduce and the
same running statistics after they are averaged (or synchronised), so each updates its own EMA and
all of them stay equal, as the models do.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

# Heads that nothing evaluates or exports: not averaged (their trained weights are kept as they are).
NOT_AVERAGED = ("classifier.",)


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first): min(decay, (1 + t) / (10 + t)).

    The EMA starts from the random initial weights. With a fixed decay of 0.99 they would still weigh
    0.99^300 = 5% after a 300-step run; with the warm-up the first update keeps only a tenth of them
    and the average's horizon grows with the run (about the last tenth of the steps so far) until it
    reaches 1 / (1 - decay) steps, at t = (10 decay - 1) / (1 - decay) (170 steps for 0.95, 890 for 0.99).
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEMA:
    """The moving average of ``model``'s parameters and buffers (all but the classifier's)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.decay, self.updates = model, decay, 0
        live = self._live()
        with torch.no_grad():
            # float32 at least (a float64 model keeps float64); clone keeps each tensor's memory format.
            self.averages = {n: t.detach().clone().to(torch.promote_types(t.dtype, torch.float32))
                             if t.is_floating_point() else t.detach().clone() for n, t in live.items()}

    def _live(self) -> dict[str, torch.Tensor]:
        """The model's tensors by state_dict name, looked up each time: moving a model may replace its buffers."""
        return {n: t for n, t in self.model.state_dict(keep_vars=True).items() if not n.startswith(NOT_AVERAGED)}

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's weights now: call it after each optimizer step taken."""
        d = warmup_decay(self.decay, self.updates)
        live = self._live()
        floats = [n for n, t in self.averages.items() if t.is_floating_point()]
        # lerp: avg + (1 - d) * (live - avg), i.e. d * avg + (1 - d) * live, in one pass over all tensors.
        torch._foreach_lerp_([self.averages[n] for n in floats],
                             [live[n].detach().to(self.averages[n].dtype) for n in floats], 1.0 - d)
        for n, avg in self.averages.items():
            if not avg.is_floating_point():
                avg.copy_(live[n])
        self.updates += 1

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with the averaged tensors in place of the trained ones (the classifier as trained)."""
        return {n: self.averages[n].to(t.dtype) if n in self.averages else t
                for n, t in self.model.state_dict().items()}

    def load(self, model_state: dict[str, torch.Tensor], updates: int) -> None:
        """Take the averages from a state_dict that ``model_state`` wrote (a checkpoint's), and their update count."""
        with torch.no_grad():
            for n, avg in self.averages.items():
                avg.copy_(model_state[n])
        self.updates = int(updates)

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the averaged weights (which it keeps as its model)."""
        return {"decay": self.decay, "updates": self.updates}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (evaluation); its trained weights put back after."""
        live = self._live()
        with torch.no_grad():
            trained = {n: t.detach().clone() for n, t in live.items()}
            for n, t in live.items():
                t.copy_(self.averages[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(trained[n])


def evaluation_weights(ema: WeightEMA | None) -> ContextManager[None]:
    """The weights a run evaluates: its EMA's with --ema-decay, else the model's own."""
    return ema.applied() if ema is not None else nullcontext()
