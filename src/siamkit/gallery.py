"""A gallery of enrolled identities on disk, and 1:N search over it (exact by matrix product; faiss optional).

GALLERY_DIR/gallery.npz holds every enrolled image's embedding, its identity, its path and a JSON header
(format, score, the model it was embedded with and that model's embedding of a fixed probe image). One
zip file, replaced atomically: a reader sees the old or the new gallery, and zip's CRCs, checked before
anything is read, make a truncated or damaged file fail to load. Changes (enroll, --add, --remove) read, change
and write the file under a lock (update_gallery), so two processes never lose each other's people. The probe embedding recognises the model whatever its form (a run or its
ONNX export embed the probe alike, to the export's 1e-4), so a gallery is never searched with another model.

An identity is represented by each of its images and by their mean (re-normalised for cosine scores);
its score against a probe is the best of these.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ._version import __version__
from .errors import SiamkitError
from .fileio import atomic_write_bytes, check_zip, file_lock, lock_path, write_error

GALLERY_FORMAT = "siamkit-gallery-v1"
GALLERY_FILE = "gallery.npz"
BACKENDS = ("exact", "faiss", "hnsw")
PROBE_TOLERANCE = 1e-3  # same model: the run and its export agree to 1e-4; another model differs by far more
_CHUNK_ELEMENTS = 1 << 25  # scores computed per block of probes: at most 32M floats (128 MB) at a time


def probe_image(channels: int, size: tuple[int, int]) -> np.ndarray:
    """A fixed uint8 [H, W, C] image (gradients and a checkerboard) whose embedding fingerprints a model."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x // 4 + y // 4) % 2) * 255]
    return np.stack([planes[c % 3] for c in range(channels)], axis=-1).astype(np.uint8)


def model_probe(verifier) -> np.ndarray:
    """The verifier's embedding [D] of probe_image: recorded at enrolment, compared before every search."""
    pre = verifier.preprocess
    # the probe is no photo of a face: embedded as it is, also by a model that cuts face chips from photos
    return verifier.embed([probe_image(pre.channels, tuple(pre.image_size))], align=False)[0]


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


@dataclass
class Gallery:
    embeddings: np.ndarray  # float32 [M, D], one row per enrolled image
    labels: np.ndarray  # int64 [M], index into names
    names: list[str]  # enrolled identities
    paths: list[str]  # one per image
    meta: dict  # format, score, model, model_probe, preprocess, calibration, ...

    @property
    def score(self) -> str:
        return self.meta["score"]

    def templates(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [M + K, D], owner [M + K]): every image's embedding, then each identity's mean."""
        k = len(self.names)
        means = np.zeros((k, self.embeddings.shape[1]), dtype=np.float64)
        np.add.at(means, self.labels, self.embeddings)
        means /= np.maximum(np.bincount(self.labels, minlength=k), 1)[:, None]
        if self.score == "cosine":
            means = normalise_rows(means)
        vectors = np.concatenate([self.embeddings, means.astype(np.float32)])
        return vectors, np.concatenate([self.labels, np.arange(k)])

    def search(self, probes: np.ndarray, k: int = 5, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """(identity indices [P, k], scores [P, k]), best first; k is capped at the number of identities."""
        vectors, owner = self.templates()
        return search(probes, vectors, owner, len(self.names), k, self.score, backend)

    def check_model(self, probe_embedding: np.ndarray, model: str) -> None:
        stored = np.asarray(self.meta["model_probe"], dtype=np.float32)
        if self.embeddings.shape[1:] != probe_embedding.shape:  # before any product of mismatched shapes
            raise SiamkitError(f"this gallery holds embeddings of dimension {self.embeddings.shape[1]}, and {model} "
                               f"makes embeddings of dimension {probe_embedding.shape[-1]}; enroll the gallery again "
                               f"with this model, or use the one it was enrolled with ({self.meta['model']})")
        if stored.shape != probe_embedding.shape or not np.abs(stored - probe_embedding).max() <= PROBE_TOLERANCE:
            if _same_path(self.meta["model"], model):  # retrained or replaced in place since the enrolment
                raise SiamkitError(f"the model {model} has changed since this gallery was enrolled with it (its weights "
                                   f"embed differently now: retrained or replaced); enroll the gallery again with it")
            raise SiamkitError(f"this gallery was enrolled with another model ({self.meta['model']}), not {model}; "
                               f"enroll the gallery again with this model, or use the one it was enrolled with")

    def remove(self, name: str) -> "Gallery":
        if name not in self.names:
            raise SiamkitError(f"{name!r} is not enrolled in this gallery; enrolled: {', '.join(self.names[:10])}"
                               f"{', ...' if len(self.names) > 10 else ''}")
        drop = self.names.index(name)
        keep = self.labels != drop
        labels = self.labels[keep]
        return Gallery(self.embeddings[keep], labels - (labels > drop), [n for n in self.names if n != name],
                       [p for p, kept in zip(self.paths, keep) if kept], self.meta)

    def add(self, other: "Gallery") -> "Gallery":
        both = sorted(set(self.names) & set(other.names))
        if both:
            raise SiamkitError(f"already enrolled: {', '.join(both[:5])}; take them out first with --remove NAME, "
                               f"or leave them out of --data")
        return Gallery(np.concatenate([self.embeddings, other.embeddings]),
                       np.concatenate([self.labels, other.labels + len(self.names)]), self.names + other.names,
                       self.paths + other.paths, self.meta)


def new_gallery(embeddings: np.ndarray, labels: np.ndarray, names: list[str], paths: list[str], *, score: str,
                model: str, probe_embedding: np.ndarray, preprocess: dict, calibration: dict | None) -> Gallery:
    meta = {
        "format": GALLERY_FORMAT, "siamkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score": score, "model": model, "model_probe": probe_embedding.tolist(), "preprocess": preprocess,
        "calibration": calibration,
    }
    return Gallery(np.asarray(embeddings, dtype=np.float32), np.asarray(labels, dtype=np.int64), list(names),
                   list(paths), meta)


def save_gallery(gallery: Gallery, folder: str | os.PathLike) -> Path:
    path = Path(folder) / GALLERY_FILE
    buf = io.BytesIO()
    np.savez(buf, embeddings=gallery.embeddings, labels=gallery.labels, names=np.array(gallery.names, dtype=str),
             paths=np.array(gallery.paths, dtype=str), meta=np.array(json.dumps(gallery.meta)))
    atomic_write_bytes(path, buf.getvalue())
    return path


def update_gallery(folder: str | os.PathLike, change: Callable[[Gallery | None], Gallery]) -> Gallery:
    """Read GALLERY_DIR/gallery.npz (None if there is none), ``change`` it and write the result, all under the
    gallery's lock: another process changing it meanwhile is waited for, never overwritten."""
    path = Path(folder) / GALLERY_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from e
    with file_lock(lock_path(path), f"the gallery {path}"):
        gallery = change(load_gallery(folder) if path.is_file() else None)
        save_gallery(gallery, folder)
    return gallery


def enroll_change(new: Gallery, probe_embedding: np.ndarray, model: str, *, add: bool,
                  replace: bool) -> Callable[[Gallery | None], Gallery]:
    """What enroll does to the gallery it finds under the lock (update_gallery): add ``new``'s people to it
    (``add``), or put ``new`` in its place, when there is none or ``replace`` is given."""
    def change(current: Gallery | None) -> Gallery:
        if add:
            if current is None:
                raise SiamkitError("the gallery to add to is gone (another process removed it); enroll again "
                                   "without --add")
            current.check_model(probe_embedding, model)
            return current.add(new)
        if current is not None and not replace:
            raise SiamkitError("another process wrote a gallery to this --out while this one embedded; pass --add "
                               "to add people to it, --force to replace it, or another --out")
        return new

    return change


def load_gallery(folder: str | os.PathLike) -> Gallery:
    folder = Path(folder)
    path = folder / GALLERY_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise SiamkitError(f"{folder} holds no {GALLERY_FILE}; create a gallery with siamkit enroll RUN --data "
                           f"FOLDER --out {folder}")
    check_zip(path, "enroll it again with siamkit enroll")
    try:
        with np.load(path, allow_pickle=False) as z:
            g = Gallery(z["embeddings"], z["labels"], [str(n) for n in z["names"]], [str(p) for p in z["paths"]],
                        json.loads(str(z["meta"])))
        ok = (g.meta.get("format") == GALLERY_FORMAT and g.embeddings.ndim == 2
              and len(g.labels) == len(g.embeddings) == len(g.paths)
              and (len(g.labels) == 0 or 0 <= g.labels.min() <= g.labels.max() < len(g.names)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise SiamkitError(f"{path} is not a readable gallery (truncated or damaged: {type(e).__name__}); "
                           f"enroll it again with siamkit enroll") from None
    if not ok:
        raise SiamkitError(f"{path} is not a siamkit gallery in format {GALLERY_FORMAT!r}; enroll it again with "
                           f"this siamkit's siamkit enroll")
    return g


# ---------------------------------------------------------------- search


def _by_identity(scores: np.ndarray, owner: np.ndarray, n_ids: int) -> np.ndarray:
    """[P, V] vector scores -> [P, n_ids]: each identity's best vector."""
    if len(owner) == n_ids and np.array_equal(owner, np.arange(n_ids)):
        return scores
    order = np.argsort(owner, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(owner[order]) != 0])
    return np.maximum.reduceat(scores[:, order], starts, axis=1)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per row, best first; ties broken by the lower index (as a stable sort would)."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        # argpartition may cut through a tie at the k-th score: take the lowest indices among equal scores.
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        cand = [np.flatnonzero(row >= t) for row, t in zip(scores, kth[:, 0])]
        part = np.stack([c[np.argsort(-s[c], kind="stable")][:k] for c, s in zip(cand, scores)])
    else:
        part = np.argsort(-scores, axis=1, kind="stable")
    return part, np.take_along_axis(scores, part, axis=1)


def exact_scores(probes: np.ndarray, vectors: np.ndarray, score: str) -> np.ndarray:
    """[P, V] similarities by one matrix product (cosine: of the normalised rows; euclidean: minus the distance)."""
    index = ExactIndex(vectors, np.arange(len(vectors)), len(vectors), score)
    return index._scores(np.atleast_2d(np.asarray(probes, dtype=np.float32)))


def search(probes: np.ndarray, vectors: np.ndarray, owner: np.ndarray, n_ids: int, k: int, score: str,
           backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Top-k identities (by each identity's best vector) for every probe: (ids [P, k], scores [P, k])."""
    return make_index(vectors, owner, n_ids, score, backend).search(probes, k)


def make_index(vectors: np.ndarray, owner: np.ndarray, n_ids: int, score: str, backend: str = "exact"):
    """An index over the gallery's vectors: ExactIndex, or FaissIndex (backend "faiss": exact, "hnsw": approximate)."""
    if backend not in BACKENDS:
        raise SiamkitError(f"unknown search backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if n_ids < 1:
        raise SiamkitError("the gallery is empty; enroll people first")
    if backend == "exact":
        return ExactIndex(vectors, owner, n_ids, score)
    return FaissIndex(vectors, owner, n_ids, score, hnsw=backend == "hnsw")


class ExactIndex:
    """Exact search by one matrix product per block of probes (the vectors are normalised once, for cosine)."""

    def __init__(self, vectors: np.ndarray, owner: np.ndarray, n_ids: int, score: str):
        if score not in ("cosine", "euclidean"):
            raise ValueError(f"unknown score {score!r}")
        v = np.asarray(vectors, dtype=np.float32)
        self.vectors = normalise_rows(v) if score == "cosine" else v
        self.sq_norms = None if score == "cosine" else (v * v).sum(1)
        self.owner, self.n_ids, self.score = np.asarray(owner), n_ids, score

    def _scores(self, p: np.ndarray) -> np.ndarray:
        if self.score == "cosine":
            return normalise_rows(p) @ self.vectors.T
        sq = (p * p).sum(1)[:, None] + self.sq_norms[None, :] - 2 * (p @ self.vectors.T)
        return -np.sqrt(np.maximum(sq, 0))

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        probes = np.atleast_2d(np.asarray(probes, dtype=np.float32))
        k = min(k, self.n_ids)
        rows = max(1, _CHUNK_ELEMENTS // max(len(self.vectors), 1))
        ids, scores = [], []
        for start in range(0, len(probes), rows):
            i, t = _top_k(_by_identity(self._scores(probes[start:start + rows]), self.owner, self.n_ids), k)
            ids.append(i)
            scores.append(t)
        return np.concatenate(ids), np.concatenate(scores)


class FaissIndex:
    """faiss over the same vectors: exact (IndexFlatIP / IndexFlatL2) or approximate (HNSW, for large galleries)."""

    def __init__(self, vectors: np.ndarray, owner: np.ndarray, n_ids: int, score: str, hnsw: bool = False,
                 hnsw_m: int = 32, ef_search: int = 128):
        try:
            import faiss
        except ImportError:
            raise SiamkitError('faiss search needs faiss-cpu: pip install "siamkit[faiss]" (or use --backend '
                               'exact)') from None
        if score not in ("cosine", "euclidean"):
            raise ValueError(f"unknown score {score!r}")
        self.faiss, self.score, self.owner, self.n_ids = faiss, score, np.asarray(owner), n_ids
        v = np.ascontiguousarray(normalise_rows(vectors) if score == "cosine" else vectors, dtype=np.float32)
        metric = faiss.METRIC_INNER_PRODUCT if score == "cosine" else faiss.METRIC_L2
        d = v.shape[1]
        if hnsw:
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, metric)
            self.index.hnsw.efSearch = ef_search
        else:
            self.index = faiss.IndexFlatIP(d) if score == "cosine" else faiss.IndexFlatL2(d)
        self.index.add(v)
        self.per_identity = int(np.bincount(self.owner, minlength=n_ids).max())

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        probes = np.atleast_2d(np.asarray(probes, dtype=np.float32))
        k = min(k, self.n_ids)
        p = np.ascontiguousarray(normalise_rows(probes) if self.score == "cosine" else probes, dtype=np.float32)
        # The k best identities' best vectors lie within the first (k - 1) * per_identity + 1 vectors.
        kk = min(self.index.ntotal, k * self.per_identity)
        dist, idx = self.index.search(p, kk)
        s = dist if self.score == "cosine" else -np.sqrt(np.maximum(dist, 0))
        if self.per_identity == 1 and (idx >= 0).all():  # one vector per identity: faiss's order is the answer
            return self.owner[idx][:, :k], s[:, :k]
        best = np.full((len(p), self.n_ids), -np.inf, dtype=np.float32)
        rows = np.repeat(np.arange(len(p)), kk)
        valid = idx.reshape(-1) >= 0  # HNSW pads with -1 when it finds fewer
        np.maximum.at(best, (rows[valid], self.owner[idx.reshape(-1)[valid]]), s.reshape(-1)[valid])
        return _top_k(best, k)


def _same_path(a: str, b: str) -> bool:
    """Whether two model paths name the same file or folder (a gallery stores its model's absolute path)."""
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (TypeError, ValueError):
        return False
