"""The SQLite store (transactions all-or-nothing, the change log, model stamps) and the live index built on it,
whose search must equal siamkit.gallery's on the same embeddings."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from siamkit.errors import SiamkitError
from siamkit.gallery import Gallery
from siamkit.serve.index import LiveIndex
from siamkit.serve.store import ModelStamp, SqliteStore, open_store

DIM = 4


def stamp(name="run", probe=(1.0, 0.0, 0.0, 0.0), dim=DIM, score="cosine") -> ModelStamp:
    return ModelStamp(name, dim, score, np.asarray(probe, np.float32).tobytes())


def vectors(*rows) -> np.ndarray:
    return np.asarray(rows, np.float32)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path)
    s.create_gallery("g", stamp())
    yield s
    s.close()


def test_enroll_rows_and_identities(store):
    ids = store.enroll("g", "ann", vectors([1, 0, 0, 0], [0, 1, 0, 0]), ["a1.jpg", "a2.jpg"])
    ids += store.enroll("g", "bob", vectors([0, 0, 1, 0]), ["b1.jpg"])
    assert ids == sorted(set(ids))
    got_ids, names, embeddings, seq = store.rows("g")
    assert got_ids.tolist() == ids and names == ["ann", "ann", "bob"]
    np.testing.assert_array_equal(embeddings, vectors([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]))
    assert embeddings.dtype == np.float32 and seq == 3  # one change per image
    assert store.identities("g") == [("ann", 2), ("bob", 1)]
    assert store.galleries() == ["g"]


def test_an_enrolment_is_all_or_nothing(store):
    """A failure at the third image's insert (a trigger refusing it) leaves neither image nor change behind."""
    store.enroll("g", "ann", vectors([1, 0, 0, 0]), ["a1"])
    before_rows, before_changes = store.rows("g"), store.changes_since("g", 0)
    store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON images WHEN NEW.source = 'bad' "
                     "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError):
        store.enroll("g", "bob", vectors([0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]), ["b1", "b2", "bad"])
    after_rows = store.rows("g")
    assert after_rows[0].tolist() == before_rows[0].tolist() and after_rows[1] == before_rows[1]
    assert store.changes_since("g", 0)[0].__len__() == len(before_changes[0])
    assert store.identities("g") == [("ann", 1)]


def test_changes_since_replays_adds_and_deletes(store):
    first = store.enroll("g", "ann", vectors([1, 0, 0, 0], [0, 1, 0, 0]), ["a1", "a2"])
    _, _, _, seq = store.rows("g")
    bob = store.enroll("g", "bob", vectors([0, 0, 1, 0]), ["b1"])
    assert store.delete_image("g", first[0])
    assert not store.delete_image("g", first[0])  # already gone
    changes, last = store.changes_since("g", seq)
    assert [(op, i, name) for op, i, name, _ in changes] == [("add", bob[0], "bob"), ("del", first[0], "ann")]
    np.testing.assert_array_equal(changes[0][3], [0, 0, 1, 0])
    assert changes[1][3] is None and last == seq + 2
    assert store.changes_since("g", last) == ([], last)
    assert store.delete_identity("g", "ann") == 1 and store.delete_identity("g", "ann") == 0


def test_galleries_are_kept_apart(store):
    store.create_gallery("h", stamp())
    store.enroll("g", "ann", vectors([1, 0, 0, 0]), ["a"])
    store.enroll("h", "zed", vectors([0, 1, 0, 0]), ["z"])
    assert store.rows("h")[1] == ["zed"] and store.identities("g") == [("ann", 1)]
    assert [c[2] for c in store.changes_since("h", 0)[0]] == ["zed"]


def test_a_gallery_keeps_its_model(store):
    store.create_gallery("g", stamp())  # the same model again: nothing happens
    store.create_gallery("g", stamp(name="export.onnx", probe=(1.0, 0.0, 0.0, 5e-4)))  # its export: within 1e-3
    with pytest.raises(SiamkitError, match="another model \\(run.*not other"):
        store.create_gallery("g", stamp(name="other", probe=(0.0, 1.0, 0.0, 0.0)))
    with pytest.raises(SiamkitError, match="dimension 4"):
        store.create_gallery("g", stamp(name="other", probe=(1.0,) * 8, dim=8))
    assert store.gallery_model("g") == stamp() and store.gallery_model("nobody") is None


def test_the_store_survives_closing(tmp_path):
    s = open_store(tmp_path)
    s.create_gallery("g", stamp())
    s.enroll("g", "ann", vectors([1, 2, 3, 4]), ["a"])
    s.close()
    again = SqliteStore(tmp_path / "galleries.sqlite")
    try:
        assert again.identities("g") == [("ann", 1)]
        np.testing.assert_array_equal(again.rows("g")[2], vectors([1, 2, 3, 4]))
        assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        again.close()


def test_an_unwritable_data_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SiamkitError, match="cannot open the gallery store"):
        open_store(blocker / "data")


@pytest.mark.parametrize("score", ["cosine", "euclidean"])
def test_live_index_search_equals_the_gallery_search(store, tmp_path, score):
    rng = np.random.default_rng(0)
    s = open_store(tmp_path / score)
    s.create_gallery("g", stamp(score=score))
    people = {f"p{i}": rng.normal(size=(1 + i % 3, DIM)).astype(np.float32) for i in range(6)}
    for name, rows in people.items():
        s.enroll("g", name, rows, [name] * len(rows))
    index = LiveIndex(s, "g", score)
    probes = rng.normal(size=(5, DIM)).astype(np.float32)
    names = sorted(people)
    labels = np.concatenate([[k] * len(people[n]) for k, n in enumerate(names)])
    gallery = Gallery(np.concatenate([people[n] for n in names]), labels, names, [""] * len(labels), {"score": score})
    ids, scores = gallery.search(probes, 3)
    got = index.search(probes, 3)
    assert [[n for n, _ in row] for row in got] == [[names[i] for i in row] for row in ids]
    np.testing.assert_allclose([[v for _, v in row] for row in got], scores, rtol=0, atol=0)  # the same code path
    # a change made through the store (by this process or another) is seen by the next search
    s.delete_identity("g", got[0][0][0])
    assert got[0][0][0] not in [n for n, _ in index.search(probes[:1], 3)[0]]
    s.close()


def test_live_index_of_an_empty_gallery_finds_nobody(store):
    index = LiveIndex(store, "g", "cosine")
    assert index.search(vectors([1, 0, 0, 0]), 3) == [[]]
    store.enroll("g", "ann", vectors([1, 0, 0, 0]), ["a"])
    assert index.search(vectors([1, 0, 0, 0]), 3)[0][0][0] == "ann"


def test_live_index_stays_equal_to_the_store_under_concurrent_writes(tmp_path):
    """Writers enrol and delete while readers refresh: afterwards the index holds exactly the store's rows."""
    import threading

    s = open_store(tmp_path)
    s.create_gallery("g", stamp())
    index = LiveIndex(s, "g", "cosine")
    rng = np.random.default_rng(1)

    def writer(w: int) -> None:
        for i in range(40):
            ids = s.enroll("g", f"w{w}-{i % 5}", rng.normal(size=(2, DIM)).astype(np.float32), ["a", "b"])
            if i % 3 == 0:
                s.delete_image("g", ids[0])
            if i % 7 == 0:
                s.delete_identity("g", f"w{w}-{i % 5}")

    def reader() -> None:
        for _ in range(60):
            index.refresh()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [threading.Thread(target=reader)
                                                                                for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index.refresh()
    ids, names, embeddings, _ = s.rows("g")
    assert sorted(index.rows) == ids.tolist()
    assert [index.rows[i][0] for i in ids.tolist()] == names
    np.testing.assert_array_equal(np.stack([index.rows[i][1] for i in ids.tolist()]), embeddings)
    s.close()
