"""Image preprocessing shared by training, evaluation and the Python API.

Images are decoded once into uint8 tensors [C, H, W] (cheap to keep in memory); normalisation
and augmentation then run on whole batches of tensors, never image by image.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import SiamkitError
from ..registry import Registry
from .pixels import IMAGENET_MEAN, IMAGENET_STD, Preprocess, image_to_array  # noqa: F401 (imported from here)


def image_to_uint8(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Centre-crop, resize and convert a PIL image to a uint8 tensor [C, H, W]."""
    return torch.from_numpy(image_to_array(img, pre))


def normalize(batch: torch.Tensor, pre: Preprocess, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32, scaled to [0, 1] and standardised with the model's mean/std."""
    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    x = (batch.float() / 255.0 - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def shift_pixels(image_size: Sequence[int]) -> int:
    """The shift of --augment flip-shift and of --eval-shifts' views: 1/16 of the shorter side (2 pixels at 32x32)."""
    return max(1, round(min(image_size) / 16))


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


@dataclass(frozen=True)
class FaceAugment:
    """Face-suited augmentation, every draw per sample, on a whole uint8 batch at once (on its device).

    One affine warp per image (scale jitter, a small rotation, a shift, a mirror; edges extended),
    then brightness and contrast, then random erasing of one rectangle (filled with noise). Draws come
    from ``generator`` alone, so a step's augmentation is a pure function of (seed, step) and --resume
    stays exact. torchvision.transforms.v2 draws one set of parameters per call, not per sample, hence this.
    """

    scale: tuple[float, float] = (0.9, 1.15)  # >1 zooms in (the face appears larger)
    rotation: float = 10.0  # degrees, either way
    shift: float = 0.08  # fraction of the image, either way
    flip: float = 0.5  # probability of a mirror image
    brightness_contrast: float = 0.3  # contrast in [1-b, 1+b] around the image mean, brightness +-b/2
    erase: float = 0.25  # probability of erasing one rectangle
    erase_area: tuple[float, float] = (0.02, 0.2)  # its area, as a fraction of the image

    @classmethod
    def from_overrides(cls, text: str) -> "FaceAugment":
        """The defaults with the fields ``text`` names changed (--face-augment): "erase=0,rotation=15,scale=0.8:1.25"
        (a range as LO:HI). An unknown field or a value outside its range is one SiamkitError naming it."""
        names = [f.name for f in fields(cls)]
        changes: dict[str, float | tuple[float, float]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in names:
                raise SiamkitError(f"--face-augment: unknown field {name!r} in {item!r}; the fields are "
                                   f"{', '.join(names)} (e.g. erase=0,scale=0.8:1.25)")
            ranged = isinstance(getattr(cls, name), tuple)
            try:
                numbers = [float(v) for v in value.split(":")]
            except ValueError:
                numbers = []
            if len(numbers) != (2 if ranged else 1):
                default = getattr(cls, name)
                example = f"{default[0]:g}:{default[1]:g}" if ranged else f"{default:g}"
                wanted = "LO:HI, two numbers" if ranged else "one number"
                raise SiamkitError(f"--face-augment: {item!r} needs {wanted}, e.g. {name}={example} (the default)")
            changes[name] = tuple(numbers) if ranged else numbers[0]
        augment = replace(cls(), **changes)
        augment._check()
        return augment

    def _check(self) -> None:
        """Every field within what the warp and the draws can do (a scale beyond 10x would sample one pixel)."""
        bounds = {"rotation": (0, 180), "shift": (0, 1), "flip": (0, 1), "brightness_contrast": (0, 1), "erase": (0, 1)}
        for name, (lo, hi) in bounds.items():
            if not lo <= getattr(self, name) <= hi:
                raise SiamkitError(f"--face-augment: {name} takes a value in [{lo}, {hi}], got {getattr(self, name)}")
        for name, lo, hi in (("scale", 0, 10), ("erase_area", 0, 1)):
            a, b = getattr(self, name)
            if not lo < a <= b <= hi:
                raise SiamkitError(f"--face-augment: {name} takes LO:HI with {lo} < LO <= HI <= {hi}, got {a:g}:{b:g}")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = batch.shape

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(batch.device)

        scale = torch.exp(uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180)
        tx, ty = uniform(-self.shift, self.shift), uniform(-self.shift, self.shift)
        mirror = torch.where(uniform(0.0, 1.0) < self.flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # The sampling grid maps output to input coordinates: the inverse of the warp applied to the image.
        theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)
        x = batch.float() / 255.0
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        b = self.brightness_contrast
        contrast = uniform(1 - b, 1 + b).view(n, 1, 1, 1)
        brightness = uniform(-b / 2, b / 2).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
        x = torch.where(self._erase_mask(n, h, w, uniform)[:, None], torch.rand(x.shape, generator=generator).to(x), x)
        return (x * 255.0).round().to(torch.uint8)

    def _erase_mask(self, n: int, h: int, w: int, uniform) -> torch.Tensor:
        """[n, h, w] True inside each image's erased rectangle (none for images not drawn for erasing)."""
        erase = uniform(0.0, 1.0) < self.erase
        area = uniform(*self.erase_area) * h * w
        aspect = torch.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
        eh = (area * aspect).sqrt().clamp(1, h).long()
        ew = (area / aspect).sqrt().clamp(1, w).long()
        y0 = (uniform(0.0, 1.0) * (h - eh + 1)).long()
        x0 = (uniform(0.0, 1.0) * (w - ew + 1)).long()
        ys = torch.arange(h, device=erase.device).view(1, h, 1)
        xs = torch.arange(w, device=erase.device).view(1, 1, w)
        inside = (ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
        inside = inside & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1))
        return inside & erase.view(n, 1, 1)


# A training batch's augmentation: (uint8 batch [N, C, H, W], the step's generator) -> the augmented batch.
Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# --augment NAME -> a function (image size (H, W), --face-augment's text) -> the Augmentation. Every draw must
# come from the generator, so that a step's batch is a pure function of (seed, step) and --resume stays exact.
# ``@register_augment("name")`` on such a function adds one.
AUGMENTATIONS: Registry = Registry("--augment")
register_augment = AUGMENTATIONS.register


@register_augment("none")
def no_augmentation(image_size: Sequence[int], settings: str) -> Augmentation:
    return lambda batch, generator: batch


@register_augment("flip")
def flip_augmentation(image_size: Sequence[int], settings: str) -> Augmentation:
    """Mirror images at random."""
    return lambda batch, generator: augment(batch, generator, flip=True)


@register_augment("flip-shift")
def flip_shift_augmentation(image_size: Sequence[int], settings: str) -> Augmentation:
    """Mirror + shifts of up to 1/16 of the side (edges repeated)."""
    shift = shift_pixels(image_size)
    return lambda batch, generator: augment(batch, generator, flip=True, shift=shift)


@register_augment("face")
def face_augmentation(image_size: Sequence[int], settings: str) -> Augmentation:
    """FaceAugment with --face-augment's changes."""
    return FaceAugment.from_overrides(settings)
