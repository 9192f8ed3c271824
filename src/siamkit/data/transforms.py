"""Image preprocessing shared by training, evaluation and the Python API.

Images are decoded once into uint8 tensors [C, H, W] (cheap to keep in memory); normalisation
and augmentation then run on whole batches of tensors, never image by image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: stored in every checkpoint and reused at evaluation."""

    image_size: tuple[int, int]  # (H, W)
    center_crop: float = 1.0  # fraction of the shorter side kept around the centre
    channels: int = 3  # 1 = greyscale, 3 = RGB
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            image_size=tuple(d["image_size"]),
            center_crop=float(d["center_crop"]),
            channels=int(d["channels"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


def image_to_uint8(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Centre-crop, resize and convert a PIL image to a uint8 tensor [C, H, W]."""
    img = img.convert("L" if pre.channels == 1 else "RGB")
    if pre.center_crop < 1.0:
        w, h = img.size
        side = min(w, h) * pre.center_crop
        # Keep the aspect ratio of the target size inside the crop.
        th, tw = pre.image_size
        ch, cw = (side, side * tw / th) if th >= tw else (side * th / tw, side)
        left, top = (w - cw) / 2, (h - ch) / 2
        img = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    h, w = pre.image_size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR, reducing_gap=None)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, pre: Preprocess, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32, scaled to [0, 1] and standardised with the model's mean/std."""
    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    x = (batch.float() / 255.0 - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def augment(batch: torch.Tensor, generator: torch.Generator, flip: bool, shift: int = 0) -> torch.Tensor:
    """Random horizontal flips and integer shifts (with edge padding) of a whole batch at once."""
    n = batch.shape[0]
    if flip:
        do_flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(do_flip.view(-1, 1, 1, 1).to(batch.device), batch.flip(-1), batch)
    if shift > 0:
        # Shift with edge padding = read every output pixel from a clamped source row and column: two
        # gathers on the batch in its own dtype, no padded float copy of it.
        c, h, w = batch.shape[1:]
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(batch.device)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(batch.device)
        rows = (dy.view(-1, 1) - shift + torch.arange(h, device=batch.device)).clamp_(0, h - 1)
        cols = (dx.view(-1, 1) - shift + torch.arange(w, device=batch.device)).clamp_(0, w - 1)
        batch = batch.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
        batch = batch.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return batch
