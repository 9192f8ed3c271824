"""Images that stay on disk until read: the decoded cache's memory-mapped rows, or a .rec's records decoded on read.

Either stands in for the uint8 image tensor [N, C, H, W] of an IdentityDataset: ``rows[i]`` for an index, a slice,
an index array or tensor is another view (nothing is read), ``read(out)`` or ``to(...)`` gives the selected images
as a tensor. Subsets and held-out splits of such a data set cost no memory, and training streams it a step at a
time (data/prefetch.py).
"""
from __future__ import annotations

import numpy as np
import torch


class LazyRows:
    """The selected ``rows`` of N images of shape ``row_shape``; subclasses say how a view is made and rows read."""

    def __init__(self, n: int, row_shape: tuple[int, ...], rows: np.ndarray | None = None):
        self.row_shape = tuple(row_shape)
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __getitem__(self, index) -> "LazyRows":
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, (int, np.integer)):
            index = [index]
        return self.view(self.rows[index])

    def view(self, rows: np.ndarray) -> "LazyRows":
        """The same images, ``rows`` of them selected."""
        raise NotImplementedError

    def read_into(self, out: np.ndarray) -> None:
        """Write the selected images into ``out`` (uint8 [len(self), *row_shape])."""
        raise NotImplementedError

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The selected images as a uint8 tensor (into ``out``, e.g. a pinned buffer, when given)."""
        if out is None:
            out = torch.empty(tuple(self.shape), dtype=torch.uint8)
        self.read_into(out.numpy())
        return out

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.read().to(*args, **kwargs)
