"""Where a server's galleries live: the Store interface, SQLite's implementation, and ``open_store``.

A gallery is a named set of enrolled images (identity, float32 embedding, source) and the model that embedded
them (ModelStamp). Every write appends to a change log with one sequence for the whole store, so each server
process keeps its in-memory index current by reading only what changed (``changes_since``) instead of reloading.

SQLite (the default): one file ``<data-dir>/galleries.sqlite`` in WAL mode with ``synchronous=FULL``: a write
acknowledged to a client has reached the disk, and an enrolment is one transaction (all its images or none).
PostgreSQL (``postgresql://...``, several processes sharing one gallery) lives in store_pg.py.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import SiamkitError
# The interface's types live a layer below (store_pg.py imports them without importing this module, whose
# open_store imports store_pg); they are this module's names too.
from .store_types import Change, ModelStamp, StoreUnavailable, refuse_other_model  # noqa: F401

SQLITE_FILE = "galleries.sqlite"


class Store(Protocol):
    def create_gallery(self, gallery: str, model: ModelStamp) -> None: ...
    def gallery_model(self, gallery: str) -> ModelStamp | None: ...
    def galleries(self) -> list[str]: ...
    def enroll(self, gallery: str, identity: str, embeddings: np.ndarray, sources: list[str]) -> list[int]: ...
    def delete_image(self, gallery: str, image_id: int) -> bool: ...
    def delete_identity(self, gallery: str, identity: str) -> int: ...
    def identities(self, gallery: str) -> list[tuple[str, int]]: ...
    def rows(self, gallery: str) -> tuple[np.ndarray, list[str], np.ndarray, int]: ...
    def changes_since(self, gallery: str, seq: int) -> tuple[list[Change], int]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS galleries (
    name TEXT PRIMARY KEY, model TEXT NOT NULL, dim INTEGER NOT NULL, score TEXT NOT NULL, probe BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT, gallery TEXT NOT NULL REFERENCES galleries(name),
    identity TEXT NOT NULL, embedding BLOB NOT NULL, source TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS images_by_gallery ON images (gallery, identity);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, gallery TEXT NOT NULL, op TEXT NOT NULL, image_id INTEGER NOT NULL,
    identity TEXT NOT NULL, embedding BLOB);
CREATE INDEX IF NOT EXISTS changes_by_gallery ON changes (gallery, seq);
"""


@contextmanager
def _reachable(path: Path):
    """sqlite3's "database is locked" / "disk I/O error" -> StoreUnavailable (503: retry), not a server error."""
    try:
        yield
    except sqlite3.OperationalError as e:
        raise StoreUnavailable(f"SQLite {path.name}: {e}") from e


class SqliteStore:
    """The Store in one SQLite file. One connection shared by the server's threads under a lock: SQLite serialises
    writers anyway, and a gallery's reads are a few milliseconds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged enrolment survives a power cut
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise SiamkitError(f"cannot open the gallery store {self.path} ({e}); pass a --data-dir that is "
                               f"writable") from None
        self.lock = threading.Lock()

    def _write(self, work):
        """Run ``work(cursor)`` in one transaction: all its statements take effect, or none."""
        with self.lock, _reachable(self.path):
            cur = self.db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = work(cur)
                cur.execute("COMMIT")
                return result
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock, _reachable(self.path):
            return self.db.execute(sql, args).fetchall()

    def create_gallery(self, gallery: str, model: ModelStamp) -> None:
        def work(cur):
            stored = _stamp(cur.execute("SELECT model, dim, score, probe FROM galleries WHERE name = ?",
                                        (gallery,)).fetchone())
            if stored is None:
                cur.execute("INSERT INTO galleries VALUES (?, ?, ?, ?, ?)",
                            (gallery, model.name, model.dim, model.score, model.probe))
            else:
                refuse_other_model(gallery, stored, model)

        self._write(work)

    def gallery_model(self, gallery: str) -> ModelStamp | None:
        rows = self._read("SELECT model, dim, score, probe FROM galleries WHERE name = ?", (gallery,))
        return _stamp(rows[0]) if rows else None

    def galleries(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM galleries ORDER BY name")]

    def enroll(self, gallery: str, identity: str, embeddings: np.ndarray, sources: list[str]) -> list[int]:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(sources):
            raise ValueError(f"{len(sources)} sources for embeddings of shape {embeddings.shape}")

        def work(cur):
            ids = []
            for row, source in zip(embeddings, sources):
                blob = row.tobytes()
                cur.execute("INSERT INTO images (gallery, identity, embedding, source) VALUES (?, ?, ?, ?)",
                            (gallery, identity, blob, source))
                ids.append(cur.lastrowid)
                cur.execute("INSERT INTO changes (gallery, op, image_id, identity, embedding) "
                            "VALUES (?, 'add', ?, ?, ?)",
                            (gallery, cur.lastrowid, identity, blob))
            return ids

        return self._write(work)

    def _delete(self, gallery: str, where: str, arg) -> list[tuple[int, str]]:
        def work(cur):
            gone = cur.execute(f"SELECT id, identity FROM images WHERE gallery = ? AND {where}",
                               (gallery, arg)).fetchall()
            for image_id, identity in gone:
                cur.execute("DELETE FROM images WHERE id = ?", (image_id,))
                cur.execute("INSERT INTO changes (gallery, op, image_id, identity) VALUES (?, 'del', ?, ?)",
                            (gallery, image_id, identity))
            return gone

        return self._write(work)

    def delete_image(self, gallery: str, image_id: int) -> bool:
        return bool(self._delete(gallery, "id = ?", int(image_id)))

    def delete_identity(self, gallery: str, identity: str) -> int:
        return len(self._delete(gallery, "identity = ?", identity))

    def identities(self, gallery: str) -> list[tuple[str, int]]:
        return [(name, n) for name, n in self._read(
            "SELECT identity, COUNT(*) FROM images WHERE gallery = ? GROUP BY identity ORDER BY identity", (gallery,))]

    def rows(self, gallery: str) -> tuple[np.ndarray, list[str], np.ndarray, int]:
        with self.lock, _reachable(self.path):  # rows and sequence in one transaction: no change falls between
            cur = self.db.cursor()
            cur.execute("BEGIN")
            try:
                found = cur.execute("SELECT id, identity, embedding FROM images WHERE gallery = ? ORDER BY id",
                                    (gallery,)).fetchall()
                seq = cur.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            finally:
                cur.execute("COMMIT")
        dim = self._dim(gallery)
        ids = np.array([r[0] for r in found], dtype=np.int64)
        vectors = (np.stack([np.frombuffer(r[2], np.float32) for r in found]) if found
                   else np.zeros((0, dim), np.float32))
        return ids, [r[1] for r in found], vectors, int(seq)

    def _dim(self, gallery: str) -> int:
        stamp = self.gallery_model(gallery)
        return 0 if stamp is None else stamp.dim

    def changes_since(self, gallery: str, seq: int) -> tuple[list[Change], int]:
        with self.lock, _reachable(self.path):
            cur = self.db.cursor()
            cur.execute("BEGIN")
            try:
                found = cur.execute("SELECT op, image_id, identity, embedding FROM changes "
                                    "WHERE gallery = ? AND seq > ? "
                                    "ORDER BY seq", (gallery, seq)).fetchall()
                last = cur.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            finally:
                cur.execute("COMMIT")
        changes = [(op, int(i), name, None if blob is None else np.frombuffer(blob, np.float32))
                   for op, i, name, blob in found]
        return changes, max(int(last), seq)

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _stamp(row) -> ModelStamp | None:
    return None if row is None else ModelStamp(row[0], int(row[1]), row[2], bytes(row[3]))


def open_store(url_or_dir: str | Path) -> Store:
    """``postgresql://...`` -> PostgresStore (store_pg.py), anything else a data folder holding galleries.sqlite."""
    text = str(url_or_dir)
    if text.startswith(("postgresql://", "postgres://")):
        from .store_pg import PostgresStore  # psycopg only when asked for

        return PostgresStore(text)
    return SqliteStore(Path(text) / SQLITE_FILE)
