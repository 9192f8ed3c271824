"""MXNet RecordIO training sets (insightface's ``train.rec`` + ``train.idx``), read without MXNet.

The format, as dmlc-core's src/recordio.cc writes and reads it and MXNet's python/mxnet/recordio.py packs images:

- a record part is the magic 0xced7230a (uint32, little-endian), a uint32 whose low 29 bits are the part's length
  and whose top 3 bits are a continuation flag, the part's bytes, and zero padding to a multiple of 4 bytes;
- dmlc's writer splits a record wherever the magic appears at a 4-aligned offset inside it, leaving those 4 bytes
  out: flag 0 is a whole record, 1 its first part, 2 a middle one, 3 the last. The reader joins the parts with
  the magic put back between them;
- an image record's payload starts with the header 'IfQQ' (flag, label, id, id2); flag > 0 means ``flag`` float32
  labels follow the header, the first of them the label; the encoded image (JPEG, PNG) comes after;
- ``train.idx`` holds "index<TAB>offset" lines, the byte offset of each record's first part;
- insightface's sets start with record 0, whose header has flag > 0 and labels (a, b): the image records are
  1..a-1, and records a..b-1 hold one identity each (its image range). Without such a header every record is an
  image.

A file that is not RecordIO (another magic where the index says a record starts) or one cut short (the index names
records past its end) is one error line; a record that is malformed in between (a damaged part header, a bad
sequence of continuation flags, a header longer than the record, a label that is no identity number) is skipped
and reported with its offset.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SiamkitError
from ..progress import progress_bar

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
HEADER = struct.Struct("<IfQQ")  # MXNet's IRHeader: flag, label, id, id2
PART = struct.Struct("<II")  # magic, (continuation flag << 29) | length
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3
# Bytes read for a record's label while scanning: the part header, the IR header and a few float labels.
HEAD_BYTES = 256


class RecordError(ValueError):
    """A malformed record: skipped and reported with its offset."""


def padded(length: int) -> int:
    return (length + 3) & ~3


class RecordReader:
    """Reads joined records at byte offsets of a .rec file; thread-safe (pread) and picklable (the file is reopened
    in each process), so decoding workers share one."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)  # opened once: threads share it (pread has no file position)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def part(self, offset: int, limit: int | None = None) -> tuple[int, bytes, int]:
        """(continuation flag, the part's bytes (at most ``limit``), offset of the next part) at ``offset``."""
        head = self._pread(PART.size, offset)
        if len(head) < PART.size:
            raise RecordError("the file ends inside its header")
        magic, word = PART.unpack(head)
        if magic != MAGIC:
            raise RecordError(f"no record starts there (magic {magic:#010x}, expected {MAGIC:#010x})")
        flag, length = word >> LENGTH_BITS, word & ((1 << LENGTH_BITS) - 1)
        want = length if limit is None else min(length, limit)
        data = self._pread(want, offset + PART.size)
        if len(data) < want:
            raise RecordError(f"its {length} bytes run past the end of the file")
        return flag, data, offset + PART.size + padded(length)

    def read(self, offset: int) -> bytes:
        """The record whose first part is at ``offset``, its parts joined with the magic between them."""
        flag, data, after = self.part(offset)
        if flag == WHOLE:
            return data
        if flag != FIRST:
            raise RecordError(f"its first part has continuation flag {flag} (expected 0 or 1)")
        parts = [data]
        while flag != LAST:
            flag, data, after = self.part(after)
            if flag not in (MIDDLE, LAST):
                raise RecordError(f"a continuation part has flag {flag} (expected 2 or 3)")
            parts.append(data)
        return MAGIC_BYTES.join(parts)

    def head(self, offset: int) -> bytes:
        """The start of the record at ``offset`` (enough for its header and labels), read without the rest."""
        flag, data, _ = self.part(offset, HEAD_BYTES)
        return data if flag == WHOLE or len(data) == HEAD_BYTES else self.read(offset)[:HEAD_BYTES]

    def image(self, offset: int) -> io.BytesIO:
        """The encoded image of the record at ``offset`` (a file object for Pillow); RecordError if malformed."""
        return io.BytesIO(unpack(self.read(offset))[1])

    __call__ = image  # the decoded cache's workers call the reader on each offset


def unpack(payload: bytes) -> tuple[np.ndarray, bytes]:
    """(labels: the header's label, or its ``flag`` float labels; what follows) of a record's payload."""
    if len(payload) < HEADER.size:
        raise RecordError(f"it holds {len(payload)} bytes, less than its {HEADER.size}-byte header")
    flag, label, _, _ = HEADER.unpack_from(payload)
    if flag == 0:
        return np.array([label], dtype=np.float32), payload[HEADER.size:]
    end = HEADER.size + 4 * flag
    if end > len(payload):
        raise RecordError(f"its header announces {flag} labels, more than the record holds")
    return np.frombuffer(payload, dtype="<f4", count=flag, offset=HEADER.size), payload[end:]


def identity_of(labels: np.ndarray) -> int:
    """The identity number of an image record (its first label), or RecordError."""
    value = float(labels[0])
    if not (np.isfinite(value) and value >= 0 and value == int(value)):
        raise RecordError(f"its label {value:g} is not an identity number (a whole number >= 0)")
    return int(value)


@dataclass
class RecordListing:
    """The image records of a .rec file: offsets and identity numbers, and the records skipped, with why."""

    indices: np.ndarray  # int64, the .idx index of each usable image record
    offsets: np.ndarray  # int64, its byte offset
    labels: np.ndarray  # int64, its identity number as the file has it
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (which record, why)


class RecordFile:
    """A .rec file and the .idx beside it, checked on opening: one error line for what is not (all) RecordIO."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.idx_path = self.path.with_suffix(".idx")
        if not self.path.is_file():
            raise SiamkitError(f"RecordIO file {self.path} does not exist; pass the path of a train.rec")
        self.indices, self.offsets = read_index(self.idx_path, self.path)
        self.reader = RecordReader(self.path)
        self.size = self.path.stat().st_size
        self._check_ends()

    def where(self, index: int, offset: int) -> str:
        return f"{self.path} record {index} at byte {offset}"

    def _check_ends(self) -> None:
        """The first record is RecordIO and the last one is complete, else one line naming the fix."""
        first, last = int(np.argmin(self.offsets)), int(np.argmax(self.offsets))
        try:
            self.reader.part(int(self.offsets[first]), 0)
        except RecordError as e:
            where = self.where(int(self.indices[first]), int(self.offsets[first]))
            raise SiamkitError(f"{self.path} is not a RecordIO file: {where}: {e}; pass an MXNet/insightface "
                               f"train.rec") from None
        try:
            self.reader.read(int(self.offsets[last]))
        except RecordError as e:
            raise SiamkitError(f"{self.path} is truncated: {self.idx_path.name} names a record at byte "
                               f"{int(self.offsets[last])} but the file holds {self.size} bytes ({e}); copy the "
                               f"complete file again") from None

    def image_indices(self) -> np.ndarray:
        """The .idx indices of the image records: 1..a-1 under an insightface header record 0, else all."""
        present = np.isin(0, self.indices)
        if present:
            where = int(self.offsets[np.flatnonzero(self.indices == 0)[0]])
            try:
                payload = self.reader.head(where)
                flag = HEADER.unpack_from(payload)[0] if len(payload) >= HEADER.size else 0
                labels = unpack(payload)[0] if flag > 0 else None
            except RecordError as e:
                raise SiamkitError(f"{self.where(0, where)}, the header record, is malformed ({e}); copy the "
                                   f"complete file again") from None
            if labels is not None:
                end = int(labels[0])
                return self.indices[(self.indices >= 1) & (self.indices < end)]
        return self.indices

    def scan(self, progress: bool = True) -> RecordListing:
        """Every image record's identity number, read from its header (not its image)."""
        wanted = self.image_indices()
        order = np.argsort(self.indices)  # arrays, not a dict: 5.8M records (MS1M) would take GBs as Python objects
        offsets = self.offsets[order[np.searchsorted(self.indices[order], wanted)]]
        labels = np.full(len(wanted), -1, dtype=np.int64)
        skipped = []
        with progress_bar(total=len(wanted), desc="scan", unit="rec", disable=not progress, dynamic_ncols=True) as bar:
            for k, (index, offset) in enumerate(zip(wanted.tolist(), offsets.tolist())):
                try:
                    labels[k] = identity_of(unpack(self.reader.head(offset))[0])
                except RecordError as e:
                    skipped.append((self.where(index, offset), str(e)))
                bar.update(1)
        keep = labels >= 0
        return RecordListing(wanted[keep], offsets[keep], labels[keep], skipped)


def read_index(idx_path: Path, rec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(indices, offsets) of a .idx file's "index<TAB>offset" lines, or one error line."""
    try:
        text = idx_path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SiamkitError(f"{rec_path} has no index {idx_path} beside it; a RecordIO training set is a .rec with "
                           f"its .idx of the same name") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SiamkitError(f"cannot read the index {idx_path} ({e}); pass the .idx written with the .rec") from None
    indices, offsets = [], []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise SiamkitError(f"{idx_path} line {no}: expected 'index<TAB>offset', got {line[:60]!r}; pass the .idx "
                               f"written with the .rec")
        indices.append(int(fields[0]))
        offsets.append(int(fields[1]))
    if not indices:
        raise SiamkitError(f"{idx_path} lists no records; pass the .idx written with the .rec")
    if len(set(indices)) != len(indices):
        raise SiamkitError(f"{idx_path} lists an index twice; pass the .idx written with the .rec")
    return np.array(indices, dtype=np.int64), np.array(offsets, dtype=np.int64)


def identity_names(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(labels renumbered 0..n-1 in the order of the file's numbers, names: those numbers zero-padded so they sort
    like them)."""
    used = np.unique(labels)
    width = len(str(int(used[-1]))) if len(used) else 1
    return np.searchsorted(used, labels).astype(np.int64), [f"{int(u):0{width}d}" for u in used]
