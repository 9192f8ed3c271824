"""How fast a RecordIO training set is read: the header scan, the decode into the decoded cache, and streaming.

Writes a synthetic insightface-style train.rec/.idx of N JPEG faces (the AT&T faces resized to SIZE px, 10 images
per identity, a header record 0) into a temporary folder, then times, with siamkit's own code:
- scan: every record's identity number read from its header (src/siamkit/data/recordio.py RecordFile.scan);
- cache: the whole set decoded into a fresh decoded cache (data/cache.py load_cached_recordio, every core);
- stream: random batches decoded straight from the .rec (data/record_images.py RecordRows, a pool of threads),
  what a training step reads when the disk cannot hold the decoded set.
Prints one table row per N. Usage: PYTHONPATH=src python benchmarks/recordio_read.py --images 2000 20000
"""
from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from siamkit.data.cache import load_cached_recordio
from siamkit.data.record_images import RecordRows
from siamkit.data.recordio import RecordFile
from siamkit.data.sources import ATT_FACES_PNG, ATT_SHAPE
from siamkit.data.transforms import Preprocess

MAGIC = 0xCED7230A


def att_jpegs(size: int) -> list[bytes]:
    """The 400 AT&T faces as SIZE x SIZE RGB JPEGs (quality 90), from the copy shipped inside siamkit."""
    n_ids, per_id, h, w = ATT_SHAPE
    grid = np.asarray(Image.open(ATT_FACES_PNG))
    out = []
    for i in range(n_ids * per_id):
        r, c = divmod(i, per_id)
        face = Image.fromarray(grid[r * h:(r + 1) * h, c * w:(c + 1) * w]).convert("RGB").resize((size, size))
        buf = io.BytesIO()
        face.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pack(path: Path, jpegs: list[bytes], n: int) -> None:
    """Record 0 (labels: n + 1, the end of the image records), then n image records, 10 per identity; whole records
    only (this reader reads parts by their length, so a magic inside a JPEG changes nothing here)."""
    lines = []
    with open(path, "wb") as f:
        for index in range(n + 1):
            if index == 0:
                payload = struct.pack("<IfQQ2f", 2, 0.0, 0, 0, n + 1, n + 1)
            else:
                payload = struct.pack("<IfQQ", 0, float((index - 1) // 10), index, 0) + jpegs[(index - 1) % len(jpegs)]
            lines.append(f"{index}\t{f.tell()}\n")
            f.write(struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4))
    path.with_suffix(".idx").write_text("".join(lines))


def measure(n: int, size: int, batch: int, jpegs: list[bytes]) -> dict:
    pre = Preprocess(image_size=(size, size), channels=3)
    with tempfile.TemporaryDirectory(prefix="siamkit-recordio-") as tmp:
        rec = Path(tmp) / "train.rec"
        pack(rec, jpegs, n)
        start = time.perf_counter()
        records = RecordFile(rec)
        listing = records.scan(progress=False)
        scan_s = time.perf_counter() - start
        start = time.perf_counter()
        load_cached_recordio(rec, pre, Path(tmp) / "cache", progress=False)
        cache_s = time.perf_counter() - start
        rows = RecordRows(records.reader, listing.offsets, pre)
        rng = np.random.default_rng(0)
        batches = [rng.choice(n, batch, replace=False) for _ in range(5)]
        start = time.perf_counter()
        for picked in batches:
            rows[picked].read()
        stream_s = time.perf_counter() - start
        return {"images": n, "rec_mb": rec.stat().st_size / 2**20, "scan_per_s": n / scan_s,
                "cache_per_s": n / cache_s, "stream_per_s": len(batches) * batch / stream_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=112, help="side of the JPEGs and of the decoded images")
    parser.add_argument("--batch", type=int, default=256, help="images per streamed batch (5 batches timed)")
    args = parser.parse_args(argv)
    jpegs = att_jpegs(args.size)
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {args.size}x{args.size} RGB JPEG q90, "
          f"streamed batches of {args.batch}")
    print("| images | .rec MB | scan (records/s) | decode into the cache (images/s) | streamed (images/s) |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.images:
        r = measure(n, args.size, args.batch, jpegs)
        print(f"| {r['images']:,} | {r['rec_mb']:.1f} | {r['scan_per_s']:,.0f} | {r['cache_per_s']:,.0f} | "
              f"{r['stream_per_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
