"""Embedding extraction: each image once, in batches, in eval mode.

An image's embedding may average several fixed views of it (test-time augmentation): its mirror image
(``flip``, --eval-flip) and four copies shifted by 1/16 of the side (``shifts``, --eval-shifts), each with its
mirror under ``flip``. view_embedding is the one place that computes this, for evaluation, the Python API
and the exported graph alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.transforms import Preprocess, normalize, shift_pixels

# The shifted views, in units of the shift: right, left, down, up (each view reads the image from that side).
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


@torch.inference_mode()  # lighter than no_grad: no autograd metadata or version counters
def embed_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    pre: Preprocess,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    flip: bool = False,
    channels_last: bool = True,
    sharded: bool = False,
    shifts: bool = False,
) -> np.ndarray:
    """uint8 images [N, C, H, W] -> float32 embeddings [N, D].

    ``flip`` adds the embedding of the mirrored image, ``shifts`` those of four shifted copies (view_embedding);
    l2 embeddings are then re-normalised, the others averaged. ``sharded``: in a distributed run every process
    embeds a contiguous share of the images and the shares are all-gathered, so each process returns all N rows
    (every process must call this with the same images and an identical model).
    """
    device = torch.device(device)
    world = dist.get_world_size() if sharded and dist.is_available() and dist.is_initialized() else 1
    if world == 1 or len(images) < world:
        out = _embed(model, images, pre, device, batch_size, flip, shifts, channels_last, on_device=False)
        return out.numpy() if out is not None else np.zeros((0, 0), dtype=np.float32)
    rank, n = dist.get_rank(), len(images)
    bounds = [r * n // world for r in range(world + 1)]
    # Kept on the device for the collective (NCCL gathers GPU tensors; a share is N/world rows).
    mine = _embed(model, images[bounds[rank] : bounds[rank + 1]], pre, device, batch_size, flip, shifts, channels_last,
                  True)
    # all_gather needs equal shapes: pad each share to the largest one, then trim.
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = torch.zeros((longest, mine.shape[1]), dtype=mine.dtype, device=mine.device)
    padded[: len(mine)] = mine
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    return torch.cat([s[: b - a] for s, a, b in zip(shares, bounds, bounds[1:])]).cpu().numpy()


def view_embedding(model: torch.nn.Module, x: torch.Tensor, flip: bool, shift: int) -> torch.Tensor:
    """The embedding [N, D] siamkit uses for a normalised batch ``x`` [N, C, H, W]: the model's own, plus the mirror
    image's with ``flip``, plus four copies shifted by ``shift`` pixels (edges repeated), each with its mirror under
    ``flip``, with ``shift`` > 0. l2 embeddings are summed and re-normalised (the direction of their mean), the
    others averaged. Pad and slice only, so the exported ONNX graph computes it too (export.py)."""
    views = [x]
    if shift > 0:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        views += [padded[..., shift + dy * shift : shift + dy * shift + h, shift + dx * shift : shift + dx * shift + w]
                  for dx, dy in SHIFTS]
    e, n = None, 0
    for v in views:
        for u in (v, v.flip(-1)) if flip else (v,):  # each mirror made when used: one extra copy alive at a time
            out = model.embed(u).float()
            e, n = (out if e is None else e + out), n + 1
    if n == 1:
        return e
    l2 = getattr(getattr(model, "spec", None), "embedding_activation", "l2") == "l2"
    return F.normalize(e, dim=1) if l2 else e / n


def _embed(model, images, pre, device, batch_size, flip, shifts, channels_last, on_device: bool) -> torch.Tensor | None:
    """Embeddings of ``images`` (None for no images), on ``device`` or moved to the CPU batch by batch."""
    was_training = model.training
    model.eval()
    shift = shift_pixels(pre.image_size) if shifts else 0
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True), pre, channels_last)
            e = view_embedding(model, x, flip, shift)
            out.append(e if on_device else e.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else None
