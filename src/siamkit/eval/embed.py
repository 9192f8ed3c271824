"""Embedding extraction: each image once, in batches, in eval mode."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.transforms import Preprocess, normalize


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
) -> np.ndarray:
    """uint8 images [N, C, H, W] -> float32 embeddings [N, D].

    ``flip`` adds the embedding of the mirrored image; l2 embeddings are then re-normalised,
    the others averaged. ``sharded``: in a distributed run every process embeds a contiguous
    share of the images and the shares are all-gathered, so each process returns all N rows
    (every process must call this with the same images and an identical model).
    """
    device = torch.device(device)
    world = dist.get_world_size() if sharded and dist.is_available() and dist.is_initialized() else 1
    if world == 1 or len(images) < world:
        out = _embed(model, images, pre, device, batch_size, flip, channels_last, on_device=False)
        return out.numpy() if out is not None else np.zeros((0, 0), dtype=np.float32)
    rank, n = dist.get_rank(), len(images)
    bounds = [r * n // world for r in range(world + 1)]
    # Kept on the device for the collective (NCCL gathers GPU tensors; a share is N/world rows).
    mine = _embed(model, images[bounds[rank] : bounds[rank + 1]], pre, device, batch_size, flip, channels_last, True)
    # all_gather needs equal shapes: pad each share to the largest one, then trim.
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = torch.zeros((longest, mine.shape[1]), dtype=mine.dtype, device=mine.device)
    padded[: len(mine)] = mine
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    return torch.cat([s[: b - a] for s, a, b in zip(shares, bounds, bounds[1:])]).cpu().numpy()


def _embed(model, images, pre, device, batch_size, flip, channels_last, on_device: bool) -> torch.Tensor | None:
    """Embeddings of ``images`` (None for no images), on ``device`` or moved to the CPU batch by batch."""
    was_training = model.training
    model.eval()
    l2 = getattr(getattr(model, "spec", None), "embedding_activation", "l2") == "l2"
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True), pre, channels_last)
            e = model.embed(x).float()
            if flip:
                e = e + model.embed(x.flip(-1)).float()
                e = F.normalize(e, dim=1) if l2 else e / 2
            out.append(e if on_device else e.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else None
