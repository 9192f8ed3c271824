"""A gallery's search index in memory, kept current from the store's change log.

Built once from ``store.rows(g)``, then updated in place from ``store.changes_since(g, seq)`` before each search
(one query that returns nothing when nothing changed). The search itself is siamkit.gallery's: an identity scores
by the best of its images and of their mean, as `siamkit identify` searches a gallery.npz, so the server and the
command line give the same answers on the same gallery.
"""
from __future__ import annotations

import threading

import numpy as np

from ..gallery import Gallery, make_index
from .store import Store


class LiveIndex:
    def __init__(self, store: Store, gallery: str, score: str, backend: str = "exact"):
        self.store, self.gallery, self.score, self.backend = store, gallery, score, backend
        self.lock = threading.Lock()  # the rows, while a search reads them or a refresh changes them
        # One refresh at a time, from reading the changes to applying them: two overlapping refreshes could
        # otherwise apply an older read after a newer one and bring back a deleted image.
        self.refresh_lock = threading.Lock()
        ids, names, vectors, self.seq = store.rows(gallery)
        self.rows: dict[int, tuple[str, np.ndarray]] = {int(i): (n, v) for i, n, v in zip(ids, names, vectors)}
        self._search = None  # (index, names): rebuilt lazily after a change

    def refresh(self) -> None:
        """Apply the changes made since the last refresh (by this process or another sharing the store)."""
        with self.refresh_lock:
            changes, seq = self.store.changes_since(self.gallery, self.seq)
            with self.lock:
                for op, image_id, identity, embedding in changes:
                    if op == "add":
                        self.rows[image_id] = (identity, np.asarray(embedding, np.float32))
                    else:
                        self.rows.pop(image_id, None)
                if changes:
                    self._search = None
                self.seq = max(self.seq, seq)

    def __len__(self) -> int:
        return len(self.rows)

    def identity_count(self) -> int:
        with self.lock:
            return len({name for name, _ in self.rows.values()})

    def _built(self):
        """(index over every image and each identity's mean, identity names), as Gallery.search builds them."""
        if self._search is None:
            ids = sorted(self.rows)
            names = sorted({self.rows[i][0] for i in ids})
            where = {name: k for k, name in enumerate(names)}
            vectors = np.stack([self.rows[i][1] for i in ids])
            labels = np.array([where[self.rows[i][0]] for i in ids], dtype=np.int64)
            gallery = Gallery(vectors, labels, names, [""] * len(ids), {"score": self.score})
            templates, owner = gallery.templates()
            self._search = (make_index(templates, owner, len(names), self.score, self.backend), names)
        return self._search

    def search(self, probes: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (identity, score) per probe, best first; [] per probe when the gallery is empty."""
        self.refresh()
        with self.lock:
            if not self.rows:
                return [[] for _ in probes]
            index, names = self._built()
        found, scores = index.search(probes, k)  # a built index is never changed (a change builds a new one)
        return [[(names[i], float(s)) for i, s in zip(row, srow)] for row, srow in zip(found, scores)]
