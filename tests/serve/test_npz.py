"""gallery.npz in and out of a server's store (serve/npz.py), on SQLite and PostgreSQL: the identities, embeddings and
model survive the round trip, search answers as on the original file, another model is refused, an import cut short
is finished by --skip-existing; and end to end through the command line with `siamkit enroll` and `identify`."""
from __future__ import annotations

import numpy as np
import pytest

from siamkit.errors import SiamkitError
from siamkit.gallery import GALLERY_FILE, load_gallery, new_gallery, save_gallery
from siamkit.serve.npz import export_npz, import_npz, stamp_of
from siamkit.serve.store import SqliteStore, StoreUnavailable
from pg_fixtures import pg_dsn, postgres_server  # noqa: F401  (fixtures: imported, not in a conftest.py)

DIM = 6
PEOPLE = {"ann": 3, "bo": 1, "cy": 4}  # identity -> images


def make_npz(folder, names=PEOPLE, model="/runs/a", probe_seed=0, seed=1):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(names)), list(names.values()))
    g = new_gallery(rng.standard_normal((len(labels), DIM)).astype(np.float32), labels, list(names),
                    [f"/photos/{list(names)[k]}/{i}.jpg" for i, k in enumerate(labels)], score="cosine", model=model,
                    probe_embedding=np.random.default_rng(probe_seed).standard_normal(DIM).astype(np.float32),
                    preprocess={"image_size": [32, 32]}, calibration=None)
    save_gallery(g, folder)
    return g


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "data" / "galleries.sqlite")
    else:
        from siamkit.serve.store_pg import PostgresStore

        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    yield s
    s.close()


def per_identity(g) -> dict[str, np.ndarray]:
    return {name: g.embeddings[g.labels == k] for k, name in enumerate(g.names)}


def test_round_trip_keeps_people_embeddings_and_model(store, tmp_path):
    original = make_npz(tmp_path / "in")
    done = import_npz(store, "staff", tmp_path / "in" / GALLERY_FILE)
    assert (done.identities, done.images, done.skipped) == (3, 8, [])
    assert store.identities("staff") == sorted(PEOPLE.items())
    assert store.gallery_model("staff").same_model(stamp_of(original))
    export_npz(store, "staff", tmp_path / "out")
    back = load_gallery(tmp_path / "out")
    assert back.names == sorted(PEOPLE) and back.meta["model"] == "/runs/a" and back.score == "cosine"
    assert back.meta["model_probe"] == original.meta["model_probe"]
    mine, theirs = per_identity(back), per_identity(original)
    assert all(np.array_equal(mine[n], theirs[n]) for n in PEOPLE)  # float32 bytes, in enrolment order
    back.check_model(np.asarray(original.meta["model_probe"], np.float32), "/runs/a")  # identify's own check passes
    probes = np.random.default_rng(7).standard_normal((5, DIM)).astype(np.float32)
    (i1, s1), (i2, s2) = original.search(probes, k=3), back.search(probes, k=3)
    assert [[original.names[i] for i in r] for r in i1] == [[back.names[i] for i in r] for r in i2]
    # the identity means are summed in float64 in another row order: at most an ulp of float32 apart
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    assert all(p.startswith("staff#") for p in back.paths)  # the server's image ids, for DELETE


def test_another_model_is_refused_and_nothing_imported(store, tmp_path):
    make_npz(tmp_path / "a")
    import_npz(store, "staff", tmp_path / "a")
    make_npz(tmp_path / "b", names={"dee": 2}, model="/runs/b", probe_seed=5)
    with pytest.raises(SiamkitError, match=r"another model \(/runs/b.*'staff' \(/runs/a") as e:
        import_npz(store, "staff", tmp_path / "b")
    assert "\n" not in str(e.value) and store.identities("staff") == sorted(PEOPLE.items())


def test_people_already_there_are_refused_or_skipped(store, tmp_path):
    make_npz(tmp_path / "a")
    store.create_gallery("staff", stamp_of(load_gallery(tmp_path / "a")))
    store.enroll("staff", "bo", np.ones((2, DIM), np.float32), ["x", "y"])
    with pytest.raises(SiamkitError, match="already in the server's gallery 'staff': bo; .*--skip-existing"):
        import_npz(store, "staff", tmp_path / "a")
    assert store.identities("staff") == [("bo", 2)]
    done = import_npz(store, "staff", tmp_path / "a", skip_existing=True)
    assert (done.identities, done.images, done.skipped) == (2, 7, ["bo"])
    assert store.identities("staff") == [("ann", 3), ("bo", 2), ("cy", 4)]  # bo's two server images kept


def test_an_import_cut_short_leaves_whole_people_and_is_finished_by_skip_existing(tmp_path):
    make_npz(tmp_path / "a")
    real = SqliteStore(tmp_path / "galleries.sqlite")

    class Failing:  # the database goes away at the second enrolment
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def enroll(self, *args):
            self.calls += 1
            if self.calls == 2:
                raise StoreUnavailable("the gallery database is unreachable (test)")
            return real.enroll(*args)

    with pytest.raises(SiamkitError, match="1 of 3 identities were imported.*--skip-existing"):
        import_npz(Failing(), "staff", tmp_path / "a")
    assert real.identities("staff") == [("ann", 3)]
    assert import_npz(real, "staff", tmp_path / "a", skip_existing=True).identities == 2
    assert real.identities("staff") == sorted(PEOPLE.items())
    real.close()


def test_bad_names_and_outputs_are_one_line_and_write_nothing(tmp_path):
    store = SqliteStore(tmp_path / "galleries.sqlite")
    make_npz(tmp_path / "slash", names={"a/b": 1})
    for call, message in [
        (lambda: import_npz(store, "staff", tmp_path / "slash"), "identity name 'a/b' holds a path separator"),
        (lambda: import_npz(store, "../up", tmp_path / "slash"), "gallery name '../up' is not allowed"),
        (lambda: import_npz(store, "staff", tmp_path / "none"), "holds no gallery.npz"),
        (lambda: export_npz(store, "nobody", tmp_path / "out"), "there is no gallery 'nobody'"),
    ]:
        with pytest.raises(SiamkitError, match=message):
            call()
    assert store.galleries() == []
    make_npz(tmp_path / "a")
    import_npz(store, "staff", tmp_path / "a")
    with pytest.raises(SiamkitError, match="pass a folder"):
        export_npz(store, "staff", tmp_path / "out.npz")
    export_npz(store, "staff", tmp_path / "a" / GALLERY_FILE, force=True)  # FOLDER/gallery.npz names the folder
    with pytest.raises(SiamkitError, match="exists; pass --force"):
        export_npz(store, "staff", tmp_path / "a")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.npz").exists()
    store.close()


def test_command_line_round_trip_with_enroll_and_identify(trained_run, att_faces, tmp_path, capsys):
    """siamkit enroll -> serve-gallery import -> the server's index answers as identify on the file; export ->
    siamkit identify on the exported file prints what it prints on the enrolled one."""
    from siamkit.cli import main
    from siamkit.serve.index import LiveIndex
    from siamkit.serve.store import open_store

    people = tmp_path / "people"
    people.mkdir()
    for person in ("s31", "s32", "s33"):
        (people / person).mkdir()
        for k in (1, 2, 3):
            (people / person / f"{k}.pgm").symlink_to(att_faces / person / f"{k}.pgm")
    data = str(tmp_path / "serve-data")
    assert main(["enroll", str(trained_run), "--data", str(people), "--out", str(tmp_path / "enrolled"),
                 "--no-progress"]) == 0
    assert main(["serve-gallery", "import", str(tmp_path / "enrolled"), "--gallery", "staff", "--data-dir", data]) == 0
    assert "imported 3 identities (9 images)" in capsys.readouterr().out
    probes = [str(att_faces / p / "9.pgm") for p in ("s31", "s32", "s33", "s34")]

    from siamkit import load

    original = load_gallery(tmp_path / "enrolled")
    embedded = load(str(trained_run)).embed(probes)
    store = open_store(data)
    served = LiveIndex(store, "staff", original.score).search(embedded, 3)  # what the server searches
    store.close()
    ids, scores = original.search(embedded, k=3)
    assert [[n for n, _ in row] for row in served] == [[original.names[i] for i in row] for row in ids]
    np.testing.assert_array_equal([[s for _, s in row] for row in served], scores)  # same vectors, same order

    assert main(["serve-gallery", "export", str(tmp_path / "exported"), "--gallery", "staff", "--data-dir", data]) == 0
    capsys.readouterr()
    outputs = []
    for folder in ("enrolled", "exported"):
        assert main(["identify", str(tmp_path / folder), *probes, "--top-k", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("top-3: ") == 4
    # the same file again: one line, nothing imported twice
    assert main(["serve-gallery", "import", str(tmp_path / "enrolled"), "--gallery", "staff", "--data-dir", data]) == 2
    assert "already in the server's gallery 'staff': s31, s32, s33" in capsys.readouterr().err
