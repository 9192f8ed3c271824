"""Streaming batches: each step's images read from the decoded cache (or decoded from a .rec) in a background
thread, a few steps ahead.

The sampler gives a step's indices as a pure function of (seed, step, rank), so the reader can prepare
future steps before the loop asks for them, and a resumed run reads exactly what the first run would
have. On CUDA the images land in pinned memory, so the copy to the GPU is asynchronous (non_blocking).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from .rows import LazyRows


class BatchPrefetcher:
    """``get(step)`` -> that step's uint8 images on ``device``; steps step+1..step+depth are read meanwhile."""

    def __init__(self, images: LazyRows, indices: Callable[[int], np.ndarray], device: torch.device, depth: int = 2):
        self.images, self.indices, self.device, self.depth = images, indices, device, depth
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siamkit-prefetch")
        self._pending: dict[int, Future] = {}

    def _read(self, step: int) -> torch.Tensor:
        rows = self.images[self.indices(step)]
        out = torch.empty(tuple(rows.shape), dtype=torch.uint8, pin_memory=self.pin) if self.pin else None
        return rows.read(out)

    def get(self, step: int) -> torch.Tensor:
        future = self._pending.pop(step, None)
        # Steps asked for out of order (none in the loop) are dropped rather than kept forever.
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        host = future.result() if future is not None else self._read(step)
        for ahead in range(step + 1, step + 1 + self.depth):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._read, ahead)
        return host.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
