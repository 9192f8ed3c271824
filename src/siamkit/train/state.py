"""A run's checkpoints: the training state assembled in one place, and written (run.restore reads it back).

Reading and writing the files (atomically, safely) is siamkit/checkpoint.py; this module decides what
a checkpoint of a run holds.
"""
from __future__ import annotations

from typing import Any

from ..checkpoint import non_finite, prune_checkpoints, rng_state, save_checkpoint
from ..errors import SiamkitError
from .head_shards import full_head_state, with_full_head
from .logging import LossWindow
from .run import Run, score_for


def training_state(run: Run, step: int, window: LossWindow, **extra: Any) -> dict[str, Any]:
    """Everything a run needs to continue exactly, and everything `siamkit.load` needs to rebuild the model."""
    t = run.training
    # "model" is what evaluate/verify/embed/export, siamkit.load and --pretrained use: the EMA's weights when the
    # run has one; the optimizer's own weights are then "trained_model", which --resume continues from.
    weights = {"model": t.model.state_dict()} if t.ema is None else {
        "model": t.ema.model_state(), "trained_model": t.model.state_dict(), "ema": t.ema.state()}
    return {
        **weights,
        "model_spec": t.model.spec.to_dict(),
        "preprocess": run.pre.to_dict(),
        "config": run.cfg.to_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "step": step,
        "epoch": step // run.sampler.steps_per_epoch,
        # Samplers are pure functions of (seed, step, rank): this is all it takes to continue the same draws.
        "sampler": {
            "type": type(run.sampler).__name__, "seed": run.cfg.seed, "step": step,
            "steps_per_epoch": run.sampler.steps_per_epoch, "world": run.ctx.world,
        },
        # Loss sums since the last metrics row, so that a resumed run logs the same rows.
        "log_window": window.state(),
        "rng": rng_state(),
        "identities": list(run.train_ds.names),
        "score": score_for(run.cfg.embedding_activation),
        "best_accuracy": run.best_accuracy,
        "alignment": run.alignment,  # how the training faces were aligned (None: not by siamkit align)
        # --cpu-tuning auto: each convolution shape's kernel, so that --resume computes alike
        "conv_kernels": t.conv_kernels,
        **extra,
    }


class Checkpoints:
    """Writes last.pt (and step-N.pt, best.pt) of a run on rank 0, and remembers the step last.pt holds."""

    def __init__(self, run: Run, window: LossWindow):
        self.run, self.window = run, window
        self.saved_step: int | None = run.start_step if run.resumed else None

    def state(self, step: int, **extra: Any) -> dict[str, Any] | None:
        """The checkpoint of ``step`` on the main process, None on the others. Every process must call it: a
        partial-FC head is gathered from all of them (train/head_shards.py)."""
        t = self.run.training
        head = full_head_state(t.partial_fc, t.optimizer) if t.partial_fc is not None else None
        if not self.run.ctx.is_main:
            return None
        state = training_state(self.run, step, self.window, **extra)
        return state if head is None else with_full_head(state, head)

    def save(self, step: int, **extra: Any) -> None:
        run = self.run
        self.require_finite(step)
        state = self.state(step, **extra)
        if run.ctx.is_main:
            save_checkpoint(run.ckpt_dir / "last.pt", state)
            if run.cfg.keep_checkpoints > 1:
                save_checkpoint(run.ckpt_dir / f"step-{step}.pt", state)
                prune_checkpoints(run.ckpt_dir, run.cfg.keep_checkpoints)
        self.saved_step = step
        run.ctx.checkpoint, run.ctx.checkpoint_step = run.ckpt_dir / "last.pt", step  # named if another process dies

    def save_best(self, step: int, **extra: Any) -> None:
        """best.pt; every process must call it (see ``state``)."""
        self.require_finite(step)
        state = self.state(step, **extra)
        if self.run.ctx.is_main:
            save_checkpoint(self.run.ckpt_dir / "best.pt", state)

    def require_finite(self, step: int) -> None:
        """Stop the run, keeping the last checkpoint, when its weights (or their average) hold NaN or infinity: a
        step can have a finite loss and gradient and still overflow the weights (a huge --lr)."""
        t = self.run.training
        bad = non_finite(t.model.state_dict()) + ([] if t.ema is None else non_finite(t.ema.model_state()))
        if bad:
            raise SiamkitError(
                f"step {step}: the model's weights are not finite (NaN or infinity in {len(bad)} tensor(s), e.g. "
                f"{bad[0]}): training stopped without saving them; {self.describe_last()}; lower --lr or check the "
                f"data")

    def describe_last(self) -> str:
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {self.run.ckpt_dir / 'last.pt'} (step {self.saved_step}) is intact"
