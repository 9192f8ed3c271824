"""A RecordIO training set's images decoded: all at once into memory, or a batch at a time from the .rec (streamed).

Streaming is for sets whose decoded images the disk cannot hold (MS1M decodes to about 218 GB at 112 px):
``RecordRows`` stands in for the image tensor of an IdentityDataset like the decoded cache's ImageRows
(data/rows.py), and decodes the records a step asks for with a pool of threads (Pillow releases the GIL while
decoding). An image that fails to decode while streaming (the scan reads headers, not images) is given as zeros,
with one warning per record naming its offset.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..errors import warn
from .pixels import Preprocess, decode_image_array
from .recordio import RecordReader
from .rows import LazyRows


def decode_workers() -> int:
    return min(8, (os.cpu_count() or 1) * 2)


def decode_record(reader: RecordReader, offset: int, pre: Preprocess, sizes: list | None = None) -> np.ndarray:
    """One record's image as uint8 [C, H, W]; ValueError (RecordError among them) with the reason if unusable."""
    return decode_image_array(reader.image(offset), pre, sizes)


def decode_records(reader: RecordReader, offsets: Sequence[int], pre: Preprocess,
                   bar=None) -> list[tuple[np.ndarray, tuple[int, int]] | str]:
    """Each record's (image, its upright (width, height)), or why it is unusable; threads decode in parallel."""

    def work(offset: int):
        sizes: list = []
        try:
            image = decode_record(reader, int(offset), pre, sizes)
        except ValueError as e:
            out = str(e)
        else:
            out = (image, sizes[0])
        if bar is not None:
            bar.update(1)
        return out

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        return list(pool.map(work, offsets))


class RecordRows(LazyRows):
    """uint8 images [N, C, H, W] decoded from a .rec when read (data/rows.py): the same interface as the decoded
    cache's ImageRows, so training streams it through the same prefetcher and evaluation embeds it batch by batch."""

    def __init__(self, reader: RecordReader, offsets: np.ndarray, pre: Preprocess, rows: np.ndarray | None = None,
                 failed: set | None = None):
        super().__init__(len(offsets), (pre.channels, *pre.image_size), rows)
        self.reader, self.offsets, self.pre = reader, np.asarray(offsets, dtype=np.int64), pre
        self.failed = set() if failed is None else failed  # offsets already warned about, shared by every view

    def view(self, rows: np.ndarray) -> "RecordRows":
        return RecordRows(self.reader, self.offsets, self.pre, rows, self.failed)

    def read_into(self, out: np.ndarray) -> None:
        """Decode the selected records into ``out``; one that fails is zeros, with one warning per record."""
        offsets = self.offsets[self.rows]
        for row, decoded in enumerate(decode_records(self.reader, offsets, self.pre)):
            if isinstance(decoded, str):
                out[row] = 0
                self._warn(int(offsets[row]), decoded)
            else:
                out[row] = decoded[0]

    def _warn(self, offset: int, why: str) -> None:
        if offset not in self.failed:
            self.failed.add(offset)
            warn(f"{self.reader.path} record at byte {offset} could not be decoded ({why}); given as a black image")
