"""PostgresStore against a real PostgreSQL (pg_fixtures.py): the same answers as SqliteStore for the same writes,
enrolments all or nothing, changes seen by a second store (another server process) through NOTIFY, in seq order
under concurrent writers, and StoreUnavailable while the database is down, then recovery on the same object."""
from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest

from pg_fixtures import eventually, pg_dsn, postgres_server  # noqa: F401  (fixtures: imported, not in a conftest.py)
from siamkit.errors import SiamkitError
from siamkit.serve.store import ModelStamp, SqliteStore, StoreUnavailable
from siamkit.serve.store_pg import PostgresStore

DIM = 8
STAMP = ModelStamp("run-a", DIM, "cosine", np.linspace(-1, 1, DIM, dtype=np.float32).tobytes())


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def replay(store, gallery: str, state: dict, seq: int) -> int:
    """Apply changes_since to ``state`` (image id -> (identity, vector)) as the server's LiveIndex does."""
    changes, seq = store.changes_since(gallery, seq)
    for op, image_id, identity, embedding in changes:
        if op == "add":
            state[image_id] = (identity, embedding)
        else:
            state.pop(image_id)  # a delete of an image the replay never added would be a skipped change
    return seq


def as_state(rows) -> dict:
    ids, names, embeddings, _ = rows
    return {int(i): (n, e) for i, n, e in zip(ids, names, embeddings)}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


@pytest.fixture
def store(pg_dsn):
    s = PostgresStore(pg_dsn)
    yield s
    s.close()


def script(store) -> list:
    """The same writes on any Store; what each returned."""
    store.create_gallery("g", STAMP)
    store.create_gallery("g", STAMP)  # idempotent for the same model
    store.create_gallery("other", STAMP)
    out = [store.enroll("g", "alice", vectors(2, 0), ["a1.jpg", "a2.jpg"]),
           store.enroll("g", "bob", vectors(1, 1), ["b1.jpg"]),
           store.enroll("other", "alice", vectors(1, 2), ["x.jpg"]),
           store.enroll("g", "alice", vectors(1, 3), ["a3.jpg"])]
    out += [store.delete_image("g", out[0][1]), store.delete_image("g", out[0][1]), store.delete_identity("g", "bob"),
            store.delete_identity("g", "nobody"), store.enroll("g", "carol", vectors(2, 4), ["c1", "c2"])]
    return out


def test_same_answers_as_sqlite_and_by_hand(store, tmp_path):
    lite = SqliteStore(tmp_path / "galleries.sqlite")
    assert script(store) == script(lite)
    # by hand: alice kept a1 and a3 (a2 deleted), bob deleted, carol enrolled with two images
    assert store.identities("g") == lite.identities("g") == [("alice", 2), ("carol", 2)]
    assert store.galleries() == lite.galleries() == ["g", "other"]
    assert store.gallery_model("g") == STAMP and store.gallery_model("missing") is None
    mine, theirs = store.rows("g"), lite.rows("g")
    assert mine[1] == theirs[1] == ["alice", "alice", "carol", "carol"]
    assert np.array_equal(mine[2], np.concatenate([vectors(2, 0)[:1], vectors(1, 3), vectors(2, 4)]))
    assert np.array_equal(mine[0], theirs[0]) and mine[2].dtype == np.float32
    state = {}
    replay(store, "g", state, 0)  # the whole change log, replayed, is the gallery
    assert same_state(state, as_state(mine))
    lite.close()


def test_another_model_is_refused_naming_both(store):
    store.create_gallery("g", STAMP)
    other = ModelStamp("run-b", DIM, "cosine", np.zeros(DIM, np.float32).tobytes())
    with pytest.raises(SiamkitError, match="run-a.*run-b"):
        store.create_gallery("g", other)
    assert store.gallery_model("g") == STAMP


def test_an_enrolment_that_fails_midway_leaves_nothing(store, pg_dsn):
    store.create_gallery("g", STAMP)
    store.enroll("g", "alice", vectors(1, 0), ["a.jpg"])
    before = store.rows("g")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the third row of the next enrolment is refused
        conn.execute("ALTER TABLE siamkit_images ADD CONSTRAINT test_refuse CHECK (source <> 'bad')")
    with pytest.raises(psycopg.errors.CheckViolation):
        store.enroll("g", "bob", vectors(3, 1), ["b1", "b2", "bad"])
    after = store.rows("g")
    assert same_state(as_state(after), as_state(before)) and after[3] == before[3]  # no row, no change logged
    assert store.enroll("g", "bob", vectors(2, 1), ["b1", "b2"])  # the store still works


def test_a_second_store_sees_the_first_ones_writes_through_notify(store, pg_dsn, monkeypatch):
    other = PostgresStore(pg_dsn)  # another server process on the same database
    try:
        store.create_gallery("g", STAMP)
        state, seq = as_state(other.rows("g")), other.rows("g")[3]
        eventually(lambda: other._listening, "the second store listens")
        seq = replay(other, "g", state, seq)
        queries = []
        real = other._query_changes
        monkeypatch.setattr(other, "_query_changes", lambda *a: queries.append(1) or real(*a))
        for _ in range(3):  # nothing changed and the listener listens: answered from memory
            assert replay(other, "g", state, seq) == seq
        assert queries == []
        ids = store.enroll("g", "alice", vectors(2, 0), ["a1", "a2"])
        seq = eventually(lambda: replay(other, "g", state, seq) or None, "the enrolment reaches the other store")
        assert sorted(state) == ids and len(queries) >= 1
        store.delete_identity("g", "alice")
        eventually(lambda: (replay(other, "g", state, seq), not state)[1], "the delete reaches the other store")
    finally:
        other.close()


def test_concurrent_writers_replay_in_seq_order(store, pg_dsn):
    """Writers on two stores race; a reader that only ever asks for changes after the last seq it saw ends with
    exactly the gallery: no change committed late under a lower seq is skipped."""
    other = PostgresStore(pg_dsn)
    store.create_gallery("g", STAMP)
    errors = []

    def write(s, worker: int) -> None:
        try:
            for i in range(15):
                ids = s.enroll("g", f"p{worker}_{i}", vectors(2, worker * 100 + i), ["x", "y"])
                if i % 3 == 0:
                    s.delete_image("g", ids[0])
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    reader_state, reader_seq = {}, 0
    writers = [threading.Thread(target=write, args=(s, w)) for w, s in enumerate([store, other, store, other])]
    for t in writers:
        t.start()
    try:
        while any(t.is_alive() for t in writers):
            reader_seq = replay(other, "g", reader_state, reader_seq)
    finally:
        for t in writers:
            t.join()
    assert errors == []
    reader_seq = replay(store, "g", reader_state, reader_seq)  # the last changes (store's own writes: no wait)
    final = store.rows("g")
    assert same_state(reader_state, as_state(final)) and reader_seq == final[3]
    assert len(final[0]) == 4 * 15 * 2 - 4 * 5  # 2 images per enrolment, one deleted from every third
    other.close()


def test_unreachable_database_at_start_is_one_line(postgres_server):
    from _serve_helpers import free_port

    with pytest.raises(SiamkitError, match=r"unreachable .*start PostgreSQL, or fix --db") as e:
        PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    assert "\n" not in str(e.value)
    with pytest.raises(SiamkitError, match=r"^--db is not a PostgreSQL connection URL \(invalid URI query") as e:
        PostgresStore("postgresql://postgres:secret@127.0.0.1/db?nonsense=1")
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_restart_under_the_store_fails_cleanly_then_recovers(store, postgres_server):
    store.create_gallery("g", STAMP)
    ids = store.enroll("g", "alice", vectors(1, 0), ["a"])
    eventually(lambda: store._listening, "the store listens")
    postgres_server.stop()
    try:
        for call in (lambda: store.identities("g"), lambda: store.enroll("g", "bob", vectors(1, 1), ["b"]),
                     lambda: store.changes_since("g", 0)):
            with pytest.raises(StoreUnavailable, match="unreachable") as e:
                call()
            assert "\n" not in str(e.value)
    finally:
        postgres_server.start()
    assert store.identities("g") == [("alice", 1)]  # the same object, no restart: the acknowledged write is there
    assert store.enroll("g", "bob", vectors(1, 1), ["b"])[0] > ids[0]
    eventually(lambda: store._listening, "the listener reconnects by itself")
