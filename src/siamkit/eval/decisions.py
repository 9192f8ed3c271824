"""Verify many pairs at once: a CSV of image pairs in, a CSV of scores and decisions out (each image embedded once).

Torch-free apart from the verifier it is given, so that an exported model verifies pairs without PyTorch.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ..errors import SiamkitError
from ..fileio import atomic_write_text
from ..outputs import check_not_input
from ..progress import progress_bar
from .verification import pair_scores

CHUNK = 64  # images per embedding call: the progress bar moves, and memory stays bounded


def read_pairs_csv(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Rows of two image paths (relative paths are relative to the CSV's folder); an optional header
    row image1,image2; blank rows and rows starting with # are skipped."""
    path = Path(path)
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would make the header a pair of paths
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SiamkitError(f"cannot read pairs file {path}: {e.strerror or e}; pass a CSV of two image paths per row") from None
    except UnicodeDecodeError:
        raise SiamkitError(f"pairs file {path} is not UTF-8 text; save it as CSV UTF-8") from None
    pairs = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and [c.lower() for c in cells] == ["image1", "image2"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise SiamkitError(f"{path} row {n} has {len(cells)} field(s); each row must be two image paths")
        pairs.append(tuple(p if p.is_absolute() else path.parent / p for p in map(Path, cells)))
    if not pairs:
        raise SiamkitError(f"{path} holds no pairs; write two image paths per row")
    missing = sorted({str(p) for pair in pairs for p in pair if not p.is_file()})
    if missing:
        raise SiamkitError(f"{len(missing)} image(s) named in {path} do not exist, e.g. {', '.join(missing[:3])}; "
                           f"paths are relative to the CSV's folder")
    return pairs


def verify_pairs_csv(verifier, pairs_csv: str | os.PathLike, out_csv: str | os.PathLike, threshold: float,
                     what: str = "", progress: bool = True) -> np.ndarray:
    """Score every pair of ``pairs_csv`` with ``verifier`` and write image1,image2,score,threshold,decision."""
    pairs = read_pairs_csv(pairs_csv)
    images = sorted({p for pair in pairs for p in pair})
    check_not_input(Path(out_csv), [Path(pairs_csv), *images])  # never the pairs file or one of its images
    row = {p: i for i, p in enumerate(images)}
    chunks = []
    for start in progress_bar(range(0, len(images), CHUNK), desc="embed", unit="chunk", disable=not progress):
        chunks.append(verifier.embed(images[start:start + CHUNK]))
    emb = np.concatenate(chunks)
    scores = pair_scores(emb[[row[a] for a, _ in pairs]], emb[[row[b] for _, b in pairs]], verifier.score_name)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image1", "image2", "score", "threshold", "decision"])
    for (a, b), s in zip(pairs, scores):
        writer.writerow([a, b, f"{s:.8f}", f"{threshold:.8f}", "same" if s >= threshold else "different"])
    atomic_write_text(out_csv, out.getvalue())
    n_same = int(np.count_nonzero(scores >= threshold))
    print(f"{len(pairs)} pairs ({len(images)} images, each embedded once): {n_same} same, "
          f"{len(pairs) - n_same} different -> {out_csv}")
    print(f"threshold {threshold:.6g}: {what}")
    return scores
