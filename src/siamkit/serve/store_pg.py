"""The gallery in PostgreSQL: one database shared by several server processes (or machines).

Same interface as SqliteStore (store.py). Three tables: galleries (name and ModelStamp), images (identity, source,
float32 embedding bytes) and changes (a bigserial ``seq`` per add or delete). Every write is one transaction that
takes the gallery's advisory lock first, so a gallery's changes commit in ``seq`` order: a reader that sees change
N of a gallery sees every earlier one, and ``changes_since`` never skips a change that commits late.

Each write also NOTIFYs the gallery's name. A background thread LISTENs on its own connection: while it listens,
``changes_since`` answers from memory (no query) for a gallery that nobody has changed since its last answer, and
queries once a notification marks the gallery changed. While the database is unreachable every call raises
StoreUnavailable (the app answers 503); connections are made again on the next call, and the listener reconnects by
itself, so the server recovers without a restart when the database comes back.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from ..errors import SiamkitError
from .store_types import Change, ModelStamp, StoreUnavailable, refuse_other_model

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
except ImportError:  # the serve extra without PostgreSQL support: one line when --db postgresql:// is given
    psycopg = None

logger = logging.getLogger("siamkit")
T = TypeVar("T")

CHANNEL = "siamkit_gallery_changes"
CONNECT_TIMEOUT_S = 3  # how long a request waits for an unreachable database before its 503
LISTEN_POLL_S = 0.5  # how often the listener looks up from its connection (to stop, or to notice a dead one)
RECONNECT_WAIT_S = 0.5  # the listener's pause between attempts while the database is down
IDLE_CONNECTIONS = 8  # connections kept open between requests (more are opened under load, then closed)
# TCP keepalives: a listener cut off without a reset (a machine or network gone) notices within about 20 s
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2}

SCHEMA = """
CREATE TABLE IF NOT EXISTS siamkit_galleries (
    name text PRIMARY KEY, model_name text NOT NULL, dim integer NOT NULL, score text NOT NULL,
    probe bytea NOT NULL, created timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS siamkit_images (
    id bigserial PRIMARY KEY, gallery text NOT NULL REFERENCES siamkit_galleries(name),
    identity text NOT NULL, source text NOT NULL, embedding bytea NOT NULL);
CREATE INDEX IF NOT EXISTS siamkit_images_by_identity ON siamkit_images (gallery, identity);
CREATE TABLE IF NOT EXISTS siamkit_changes (
    seq bigserial PRIMARY KEY, gallery text NOT NULL, op text NOT NULL CHECK (op IN ('add', 'del')),
    image_id bigint NOT NULL, identity text NOT NULL);
CREATE INDEX IF NOT EXISTS siamkit_changes_by_gallery ON siamkit_changes (gallery, seq);
"""
# Serialises schema creation: CREATE TABLE IF NOT EXISTS is not safe against a second process doing the same.
SCHEMA_LOCK = 0x5131_0001
# One gallery's writers queue on this (with hashtext(gallery)) so that its changes commit in seq order.
GALLERY_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('siamkit:' || %s))"


def describe_dsn(dsn: str) -> str:
    """The database as a message names it: user@host:port/dbname, never the password."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:  # the URL itself is not echoed: it may hold a password
        reason = (str(e).strip().splitlines() or ["unreadable"])[0]
        raise SiamkitError(f"--db is not a PostgreSQL connection URL ({reason}); use "
                           f"postgresql://USER@HOST:PORT/DBNAME") from None
    user = f"{p['user']}@" if p.get("user") else ""
    return f"postgresql://{user}{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


def _unavailable(where: str, error: Exception) -> StoreUnavailable:
    """One line: libpq's reason without its "connection to server at ... failed:" preamble or its hints."""
    lines = str(error).strip().splitlines()
    reason = lines[0].rsplit("failed: ", 1)[-1] if lines else type(error).__name__
    return StoreUnavailable(f"the gallery database {where} is unreachable ({reason})")


class _Connections:
    """A small pool: idle connections are reused; a broken one is closed and never returned."""

    def __init__(self, dsn: str, where: str):
        self.dsn, self.where = dsn, where
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    def connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVES)
        except psycopg.OperationalError as e:
            raise _unavailable(self.where, e) from None

    def take(self) -> tuple[psycopg.Connection, bool]:
        """(a connection, whether it was reused: a reused one may have died with a database restart)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
        return self.connect(), False

    def give_back(self, conn: psycopg.Connection) -> None:
        healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with self._lock:
            if healthy and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _ChangeListener(threading.Thread):
    """LISTENs for the galleries' notifications; marks galleries changed in ``on_notify``, and says through
    ``on_state`` when it starts or stops listening (notifications may have been missed in between)."""

    def __init__(self, dsn: str, on_notify: Callable[[str], None], on_state: Callable[[bool], None]):
        super().__init__(name="siamkit-pg-listen", daemon=True)
        self.dsn, self.on_notify, self.on_state = dsn, on_notify, on_state
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                     **KEEPALIVES) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.on_state(True)
                    self._receive(conn)
            except psycopg.Error:
                pass  # the database went away or is not back yet; requests answer 503 meanwhile
            finally:
                self.on_state(False)
            self.stopping.wait(RECONNECT_WAIT_S)

    def _receive(self, conn: psycopg.Connection) -> None:
        while not self.stopping.is_set():
            for note in conn.notifies(timeout=LISTEN_POLL_S):
                self.on_notify(note.payload)
            if conn.closed or conn.broken:
                raise psycopg.OperationalError("the listening connection closed")


class PostgresStore:
    """Galleries in a PostgreSQL database (``dsn``: a postgresql:// URL or a libpq connection string)."""

    def __init__(self, dsn: str, *, listen: bool = True):
        if psycopg is None:
            raise SiamkitError('--db postgresql://... needs psycopg: pip install "siamkit[serve]"')
        self.where = describe_dsn(dsn)
        self._pool = _Connections(dsn, self.where)
        self._state = threading.Lock()
        self._listening, self._generation = False, 0
        self._changed: set[str] = set()  # galleries notified since their last changes_since query
        self._settled: dict[str, int] = {}  # gallery -> seq with no change after it, while the listener listens
        try:
            self._run(lambda conn: self._create_schema(conn), idempotent=True)
        except StoreUnavailable as e:
            raise SiamkitError(f"{e}: start PostgreSQL, or fix --db") from None
        self._listener, self._closing = None, False
        if listen:
            self._listener = _ChangeListener(dsn, self._notified, self._listener_state)
            self._listener.start()

    # ------------------------------------------------------------- connections and transactions

    def _run(self, work: Callable[[psycopg.Connection], T], *, idempotent: bool) -> T:
        """``work`` on a pooled connection; a reused connection that died with a database restart is replaced
        once (``work`` raised before its commit, or is idempotent); an unreachable database -> StoreUnavailable."""
        for attempt in (0, 1):
            conn, reused = self._pool.take()
            try:
                result = work(conn)
            except psycopg.OperationalError as e:
                conn.close()
                if reused and attempt == 0 and (idempotent or not getattr(e, "siamkit_at_commit", False)):
                    self._pool.close_idle()  # its siblings died with it
                    continue
                raise _unavailable(self.where, e) from None
            except BaseException:
                self._pool.give_back(conn)  # rolled back by its transaction block; kept if it is idle again
                raise
            self._pool.give_back(conn)
            return result
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self, conn: psycopg.Connection, gallery: str) -> Iterator[None]:
        """One transaction holding ``gallery``'s write lock, NOTIFYing its name at commit. A connection lost during
        COMMIT is marked: whether the write was stored is unknown, so it is never retried."""
        committing = False
        try:
            with conn.transaction():
                conn.execute(GALLERY_LOCK_SQL, (gallery,))
                yield
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, gallery))
                committing = True
        except psycopg.OperationalError as e:
            e.siamkit_at_commit = committing
            raise
        self._notified(gallery)  # this process sees its own write at once, before the notification comes back

    @staticmethod
    def _create_schema(conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)

    # ------------------------------------------------------------- the listener's view

    def _notified(self, gallery: str) -> None:
        with self._state:
            self._changed.add(gallery)

    def _listener_state(self, listening: bool) -> None:
        with self._state:
            if listening != self._listening and not self._closing:
                logger.info(f"listening for gallery changes in {self.where}" if listening else
                            f"lost the gallery database {self.where}; requests answer 503 until it is back")
            self._listening = listening
            self._generation += 1
            self._settled.clear()  # notifications may have been missed while it did not listen

    # ------------------------------------------------------------- galleries

    def create_gallery(self, gallery: str, model: ModelStamp) -> None:
        def work(conn: psycopg.Connection) -> None:
            with self._transaction(conn, gallery):
                conn.execute("INSERT INTO siamkit_galleries (name, model_name, dim, score, probe) "
                             "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                             (gallery, model.name, model.dim, model.score, model.probe))
                stored = self._stamp(conn, gallery)
            refuse_other_model(gallery, stored, model)

        self._run(work, idempotent=True)

    @staticmethod
    def _stamp(conn: psycopg.Connection, gallery: str) -> ModelStamp | None:
        row = conn.execute("SELECT model_name, dim, score, probe FROM siamkit_galleries WHERE name = %s",
                           (gallery,)).fetchone()
        return None if row is None else ModelStamp(row[0], row[1], row[2], bytes(row[3]))

    def gallery_model(self, gallery: str) -> ModelStamp | None:
        return self._run(lambda conn: self._stamp(conn, gallery), idempotent=True)

    def galleries(self) -> list[str]:
        rows = self._run(lambda conn: conn.execute("SELECT name FROM siamkit_galleries ORDER BY name").fetchall(),
                         idempotent=True)
        return [r[0] for r in rows]

    def identities(self, gallery: str) -> list[tuple[str, int]]:
        sql = ("SELECT identity, count(*) FROM siamkit_images WHERE gallery = %s GROUP BY identity "
               "ORDER BY identity COLLATE \"C\"")
        rows = self._run(lambda conn: conn.execute(sql, (gallery,)).fetchall(), idempotent=True)
        return [(name, int(n)) for name, n in rows]

    # ------------------------------------------------------------- writes

    def enroll(self, gallery: str, identity: str, embeddings: np.ndarray, sources: list[str]) -> list[int]:
        vectors = np.ascontiguousarray(embeddings, dtype="<f4")
        if vectors.ndim != 2 or len(vectors) != len(sources):
            raise ValueError(f"{len(sources)} sources for embeddings of shape {vectors.shape}")
        if len(vectors) == 0:
            return []

        def work(conn: psycopg.Connection) -> list[int]:
            with self._transaction(conn, gallery):
                stamp = self._stamp(conn, gallery)
                if stamp is None:
                    raise SiamkitError(f"there is no gallery {gallery!r}; create it first")
                if stamp.dim != vectors.shape[1]:
                    raise SiamkitError(f"the gallery {gallery!r} holds embeddings of dimension {stamp.dim}, "
                                       f"not {vectors.shape[1]}")
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO siamkit_images (gallery, identity, source, embedding) "
                                    "VALUES (%s, %s, %s, %s) RETURNING id",
                                    [(gallery, identity, s, v.tobytes()) for s, v in zip(sources, vectors)],
                                    returning=True)
                    ids = []
                    while True:
                        ids.append(cur.fetchone()[0])
                        if not cur.nextset():
                            break
                self._log_changes(conn, gallery, "add", ids, [identity] * len(ids))
            return ids

        return self._run(work, idempotent=False)

    @staticmethod
    def _log_changes(conn: psycopg.Connection, gallery: str, op: str, ids: list[int], names: list[str]) -> None:
        conn.execute("INSERT INTO siamkit_changes (gallery, op, image_id, identity) "
                     "SELECT %s, %s, i, n FROM unnest(%s::bigint[], %s::text[]) AS t(i, n)",
                     (gallery, op, ids, names))

    def _delete(self, gallery: str, where: str, value: object) -> list[int]:
        def work(conn: psycopg.Connection) -> list[int]:
            with self._transaction(conn, gallery):
                rows = conn.execute(f"DELETE FROM siamkit_images WHERE gallery = %s AND {where} = %s "
                                    f"RETURNING id, identity", (gallery, value)).fetchall()
                if rows:
                    self._log_changes(conn, gallery, "del", [r[0] for r in rows], [r[1] for r in rows])
            return [r[0] for r in rows]

        # a retried delete finds nothing the second time, so its answer could be wrong: never retried after COMMIT
        return self._run(work, idempotent=False)

    def delete_image(self, gallery: str, image_id: int) -> bool:
        return bool(self._delete(gallery, "id", int(image_id)))

    def delete_identity(self, gallery: str, identity: str) -> int:
        return len(self._delete(gallery, "identity", identity))

    # ------------------------------------------------------------- reads for the live index

    def rows(self, gallery: str) -> tuple[np.ndarray, list[str], np.ndarray, int]:
        # One statement, one snapshot: the images and the last seq agree even while others write.
        sql = ("WITH last AS (SELECT coalesce(max(seq), 0) AS seq FROM siamkit_changes WHERE gallery = %s) "
               "SELECT last.seq, i.id, i.identity, i.embedding FROM last "
               "LEFT JOIN siamkit_images i ON i.gallery = %s ORDER BY i.id")

        def work(conn: psycopg.Connection) -> tuple[list, ModelStamp | None]:
            with self._binary_cursor(conn) as cur:
                found = cur.execute(sql, (gallery, gallery)).fetchall()
            return found, self._stamp(conn, gallery)

        found, stamp = self._run(work, idempotent=True)
        last = int(found[0][0])
        found = [r for r in found if r[1] is not None]
        d = stamp.dim if stamp is not None else 0
        ids = np.array([r[1] for r in found], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[3] for r in found), dtype="<f4").reshape(len(found), d)
        return ids, [r[2] for r in found], vectors.astype(np.float32), last

    @staticmethod
    @contextmanager
    def _binary_cursor(conn: psycopg.Connection) -> Iterator[psycopg.Cursor]:
        """A binary cursor: embeddings arrive as bytes, not hex text."""
        with conn.cursor(binary=True) as cur:
            yield cur

    def changes_since(self, gallery: str, seq: int) -> tuple[list[Change], int]:
        with self._state:
            if self._listening and gallery not in self._changed and self._settled.get(gallery) == seq:
                return [], seq  # no notification since the last query: nothing changed (no round trip)
            self._changed.discard(gallery)  # cleared before the query: a change committed during it marks it again
            generation = self._generation if self._listening else None
        changes, last = self._run(lambda conn: self._query_changes(conn, gallery, seq), idempotent=True)
        with self._state:
            if generation is not None and generation == self._generation:
                self._settled[gallery] = last
        return changes, last

    def _query_changes(self, conn: psycopg.Connection, gallery: str, seq: int) -> tuple[list[Change], int]:
        sql = ("SELECT c.seq, c.op, c.image_id, c.identity, i.embedding FROM siamkit_changes c "
               "LEFT JOIN siamkit_images i ON c.op = 'add' AND i.id = c.image_id "
               "WHERE c.gallery = %s AND c.seq > %s ORDER BY c.seq")
        with self._binary_cursor(conn) as cur:
            found = cur.execute(sql, (gallery, seq)).fetchall()
        # An image added and deleted since ``seq`` has no embedding left; its delete is in the same answer (the
        # deletes committed before this snapshot), so both are left out.
        gone = {r[2] for r in found if r[1] == "add" and r[4] is None}
        changes = [(op, int(image_id), identity, None if op == "del" else np.frombuffer(emb, dtype="<f4").copy())
                   for _, op, image_id, identity, emb in found if image_id not in gone]
        return changes, int(found[-1][0]) if found else seq

    def close(self) -> None:
        if self._listener is not None:
            self._closing = True
            self._listener.stopping.set()
            self._listener.join(timeout=5 * LISTEN_POLL_S)
        self._pool.close_idle()
