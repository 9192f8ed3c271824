"""--tensorboard: what a run records, also as TensorBoard events under RUN/tensorboard.

Scalars: every metrics.csv column (train/...) with the very values written there (rounded as in the CSV),
and the held-out metrics of each evaluation (held_out/...); the ROC as a figure; the held-out embeddings
with their identity names and thumbnails for the embedding projector. metrics.csv and loss.png stay.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SiamkitError
from ..eval.report import roc_figure
from .logging import COLUMNS

SCALARS = tuple(c for c in COLUMNS if c != "step")
HELD_OUT = ("roc_auc", "eer", "accuracy_mean", "accuracy_std", "threshold")


def require_tensorboard() -> None:
    """Fail before training starts, in one line, if the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401 (only whether it is there)
    except ImportError:
        raise SiamkitError('--tensorboard needs the tensorboard package: pip install "siamkit[tensorboard]"') from None


class TensorBoardLog:
    def __init__(self, run_dir: Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def log(self, row: dict) -> None:
        """One metrics.csv row (its formatted strings, as written to the CSV) as train/<column> scalars."""
        step = int(row["step"])
        for key in SCALARS:
            if row.get(key) not in ("", None):
                self.writer.add_scalar(f"train/{key}", float(row[key]), step)

    def held_out(self, step: int, report: dict) -> None:
        for key in HELD_OUT:
            self.writer.add_scalar(f"held_out/{key}", report[key], step)
        for key, tar in report["tar_at_far"].items():
            self.writer.add_scalar(f"held_out/tar_at_far_{key}", tar, step)
        self.writer.flush()

    def roc_and_embeddings(self, step: int, report: dict, scores, same, baseline_scores, embeddings: np.ndarray,
                           names: list[str], images: torch.Tensor) -> None:
        """The ROC figure, and the held-out embeddings with identity names and thumbnails for the projector."""
        self.writer.add_figure("held_out/roc", roc_figure(report, scores, same, baseline_scores), step)
        thumbs = images.float() / 255.0
        if thumbs.shape[1] == 1:
            thumbs = thumbs.expand(-1, 3, -1, -1)  # the projector's sprite is RGB
        self.writer.add_embedding(torch.as_tensor(embeddings), metadata=list(names), label_img=thumbs,
                                  global_step=step, tag="held_out")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
