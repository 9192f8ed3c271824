"""Gallery on disk and 1:N search (gallery.py): top-k against brute force, faiss = exact, enroll/identify round trip."""
from __future__ import annotations

import numpy as np
import pytest

from siamkit.errors import SiamkitError
from siamkit.gallery import (GALLERY_FILE, load_gallery, new_gallery, save_gallery, search)


def brute_top_k(probes, vectors, owner, n_ids, k, score):
    """Per probe: every identity's best vector by an explicit loop, sorted (score desc, index asc)."""
    out_ids, out_scores = [], []
    for p in probes:
        best = {}
        for v, o in zip(vectors, owner):
            if score == "cosine":
                s = float(np.dot(p, v) / (np.linalg.norm(p) * np.linalg.norm(v)))
            else:
                s = -float(np.linalg.norm(p - v))
            best[o] = max(best.get(o, -np.inf), s)
        order = sorted(best, key=lambda i: (-best[i], i))[:k]
        out_ids.append(order)
        out_scores.append([best[i] for i in order])
    return np.array(out_ids), np.array(out_scores)


@pytest.mark.parametrize("score", ["cosine", "euclidean"])
def test_exact_top_k_against_brute_force(score):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(40, 6)).astype(np.float32)
    owner = rng.integers(0, 12, 40)
    owner[:12] = np.arange(12)  # every identity has a vector
    probes = rng.normal(size=(7, 6)).astype(np.float32)
    ids, scores = search(probes, vectors, owner, 12, 5, score)
    want_ids, want_scores = brute_top_k(probes, vectors, owner, 12, 5, score)
    # float32 matrix product vs float64 loop: scores agree to float32 rounding of 6-term sums (|s| <= ~10).
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(ids, want_ids)


@pytest.mark.parametrize("backend", ["faiss", "hnsw"])
def test_faiss_gives_the_exact_results_on_a_small_gallery(backend):
    pytest.importorskip("faiss", reason='faiss search needs the faiss extra: pip install -e ".[test]"')
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    owner = np.repeat(np.arange(100), 3)  # three images per identity
    probes = rng.normal(size=(20, 16)).astype(np.float32)
    for score in ("cosine", "euclidean"):
        exact = search(probes, vectors, owner, 100, 5, score)
        got = search(probes, vectors, owner, 100, 5, score, backend)
        # HNSW (M=32, efSearch=128) on 300 vectors visits the whole graph: it finds the exact neighbours here.
        np.testing.assert_array_equal(got[0], exact[0])
        np.testing.assert_allclose(got[1], exact[1], atol=1e-4)  # faiss sums in another order (and squares)


def small_gallery(names=("a", "b"), per=2, seed=0):
    rng = np.random.default_rng(seed)
    n = len(names) * per
    return new_gallery(rng.normal(size=(n, 4)), np.repeat(np.arange(len(names)), per), list(names),
                       [f"{name}/{i}.png" for name in names for i in range(per)], score="cosine", model="m",
                       probe_embedding=np.ones(4, np.float32), preprocess={}, calibration=None)


def test_save_load_add_remove(tmp_path):
    g = small_gallery()
    save_gallery(g, tmp_path)
    back = load_gallery(tmp_path)
    np.testing.assert_array_equal(back.embeddings, g.embeddings)
    assert back.names == ["a", "b"] and back.paths == g.paths and back.meta == g.meta
    both = back.add(small_gallery(("c",), per=3, seed=1))
    assert both.names == ["a", "b", "c"] and list(both.labels) == [0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(SiamkitError, match="already enrolled: a"):
        both.add(small_gallery(("a",)))
    without = both.remove("b")
    assert without.names == ["a", "c"] and list(without.labels) == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(without.embeddings, both.embeddings[[0, 1, 4, 5, 6]])
    with pytest.raises(SiamkitError, match="'zed' is not enrolled"):
        without.remove("zed")


def test_a_truncated_or_foreign_gallery_is_refused_in_one_line(tmp_path):
    save_gallery(small_gallery(), tmp_path)
    data = (tmp_path / GALLERY_FILE).read_bytes()
    (tmp_path / GALLERY_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(SiamkitError, match="is not a readable gallery \\(truncated or damaged"):
        load_gallery(tmp_path)
    np.savez(tmp_path / GALLERY_FILE, x=np.zeros(3))
    with pytest.raises(SiamkitError, match="is not a readable gallery|not a siamkit gallery"):
        load_gallery(tmp_path)
    with pytest.raises(SiamkitError, match="holds no gallery.npz"):
        load_gallery(tmp_path / "nowhere")
    g = small_gallery()
    with pytest.raises(SiamkitError, match="enrolled with another model"):
        g.check_model(np.zeros(4, np.float32), "other")
    g.check_model(np.ones(4, np.float32) + 1e-5, "same model, exported")  # within the export's tolerance


# ---------------------------------------------------------------- through the command line, with a trained run


def people(root, src, names, images):
    """A folder of symlinked AT&T images: root/<name>/<i>.pgm."""
    for name in names:
        (root / name).mkdir(parents=True)
        for i in images:
            (root / name / f"{i}.pgm").symlink_to(src / name / f"{i}.pgm")
    return root


def test_enroll_add_identify_remove_round_trip(trained_run, att_faces, tmp_path, capsys):
    import siamkit
    from siamkit.cli import main
    from siamkit.gallery import exact_scores

    first = people(tmp_path / "g1", att_faces, ["s31", "s32", "s33"], range(1, 6))
    more = people(tmp_path / "g2", att_faces, ["s34", "s35"], range(1, 6))
    out = tmp_path / "gallery"
    assert main(["enroll", str(trained_run), "--data", str(first), "--out", str(out), "--no-progress"]) == 0
    assert main(["enroll", str(trained_run), "--data", str(more), "--out", str(out), "--add", "--no-progress"]) == 0
    assert "5 identities (25 images)" in capsys.readouterr().out
    g = load_gallery(out)
    assert g.names == ["s31", "s32", "s33", "s34", "s35"]
    v = siamkit.load(trained_run)
    # --add embedded only the new people, and the stored rows are the run's embeddings of those files.
    np.testing.assert_allclose(g.embeddings, v.embed(g.paths), atol=1e-5)
    probes = [str(att_faces / n / "9.pgm") for n in ("s31", "s34", "s36")]
    assert main(["identify", str(out), *probes, "--top-k", "3", "--threshold", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids, scores = search(v.embed(probes), *g.templates(), len(g.names), 3, "cosine")
    for n, probe in enumerate(probes):
        verdict = lines[2 * n].split(": ", 1)[1]
        best = g.names[ids[n][0]]
        assert verdict == (best if scores[n][0] >= 0.5 else f"unknown (best {best} {scores[n][0]:.4f} < threshold)")
        top = lines[2 * n + 1].split(": ", 1)[1].split(", ")
        assert [t.split()[0] for t in top] == [g.names[i] for i in ids[n]]
    # An identity's score is the best over its images and their (re-normalised) mean, by an independent path.
    emb = v.embed([probes[0]])
    own = g.embeddings[g.labels == 0]
    mean = own.mean(0) / np.linalg.norm(own.mean(0))
    assert scores[0][list(ids[0]).index(0)] == pytest.approx(
        max(exact_scores(emb, own, "cosine").max(), float(emb[0] @ mean)), abs=1e-5)
    assert main(["enroll", "--out", str(out), "--remove", "s32"]) == 0
    assert load_gallery(out).names == ["s31", "s33", "s34", "s35"]


def test_a_gallery_from_another_model_is_refused(trained_run, att_split, att_faces, tmp_path, capsys):
    from siamkit.cli import main
    from siamkit.train.loop import train
    from tiny_run import tiny_config

    other = tmp_path / "other"
    train(tiny_config(other, data=str(att_split[0]), backbone="resnet18", steps=1, val_identities=6), progress=False)
    folder = people(tmp_path / "g", att_faces, ["s31", "s32"], range(1, 4))
    out = tmp_path / "gallery"
    assert main(["enroll", str(trained_run), "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    before = (out / GALLERY_FILE).read_bytes()
    capsys.readouterr()
    for args in (["identify", str(out), str(att_faces / "s31" / "9.pgm"), "--model", str(other)],
                 ["enroll", str(other), "--data", str(folder), "--out", str(out), "--add", "--no-progress"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "was enrolled with another model" in err and err.count("\n") == 1
    assert (out / GALLERY_FILE).read_bytes() == before
    (out / GALLERY_FILE).write_bytes(before[:100])
    assert main(["identify", str(out), str(att_faces / "s31" / "9.pgm")]) == 2
    assert "truncated or damaged" in capsys.readouterr().err


def test_evaluate_identification_on_att(trained_run, att_faces, tmp_path, capsys):
    import json

    from siamkit.cli import main

    gallery = people(tmp_path / "gal", att_faces, [f"s{i}" for i in range(31, 36)], range(1, 6))
    probes = people(tmp_path / "probe", att_faces, [f"s{i}" for i in range(31, 41)], range(6, 11))
    assert main(["evaluate", str(trained_run), "--protocol", "identification", "--gallery", str(gallery),
                 "--probes", str(probes), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "identification.json").read_text())
    assert report["n_known_probes"] == 25 and report["n_unknown_probes"] == 25
    assert len(report["cmc"]) == 5 and report["cmc"][-1] == 1.0 and report["rank1"] == report["cmc"][0]
    assert set(report["open_set"]) == {"1e-1", "1e-2", "1e-3", "0.4"}  # 0.4 = 10 / 25 unknown probes
    assert [o["supported"] for o in report["open_set"].values()] == [False, False, False, True]
    assert report["baseline_dlib"]["n_images"] == 75  # the second baseline on the same gallery and probes
    out = capsys.readouterr().out
    assert "needs at least 100 unknown probes" in out and "pixels:" in out and "rank-1" in out and "dlib:" in out


def test_verifier_identify(trained_run, att_faces, tmp_path):
    import siamkit
    from siamkit.cli import main

    folder = people(tmp_path / "g", att_faces, ["s31", "s32", "s33"], range(1, 6))
    assert main(["enroll", str(trained_run), "--data", str(folder), "--out", str(tmp_path / "gal"),
                 "--no-progress"]) == 0
    v = siamkit.load(trained_run)
    probes = [str(att_faces / "s32" / "8.pgm"), str(att_faces / "s39" / "8.pgm")]
    got = v.identify(probes, tmp_path / "gal", k=2, threshold=0.5)
    g = load_gallery(tmp_path / "gal")
    ids, scores = g.search(v.embed(probes), 2)
    for r, row, s in zip(got, ids, scores):
        assert [name for name, _ in r["top_k"]] == [g.names[i] for i in row]
        assert r["identity"] == (g.names[row[0]] if s[0] >= 0.5 else None) and r["score"] == pytest.approx(s[0])
    # With far=, the run's calibrated threshold at that FAR decides who is unknown.
    t = v.threshold_for(1e-1)
    assert [r["identity"] is None for r in v.identify(probes, g, far=1e-1)] == [s[0] < t for s in scores]


# --- issue 28: concurrent writers, damaged files, exported models, other dimensions ----------------------------------

def test_two_processes_adding_to_one_gallery_at_once_both_end_up_in_it(trained_run, att_faces, tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from siamkit.cli import main
    from siamkit.fileio import file_lock, lock_path

    out = tmp_path / "gallery"
    first = people(tmp_path / "g0", att_faces, ["s31"], range(1, 4))
    assert main(["enroll", str(trained_run), "--data", str(first), "--out", str(out), "--no-progress"]) == 0
    folders = [people(tmp_path / f"g{n}", att_faces, [name], range(1, 4)) for n, name in ((1, "s32"), (2, "s33"))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"err{n}.txt" for n in (1, 2)]
    # Hold the gallery's lock here, so that both processes have read the gallery and embedded their people before
    # either may write: on main 935a11e (no lock) the second write replaced the first and one person was lost.
    with file_lock(lock_path(out / GALLERY_FILE), "the gallery", timeout=None):
        procs = [subprocess.Popen([sys.executable, "-m", "siamkit", "enroll", str(trained_run), "--data", str(folder),
                                   "--out", str(out), "--add", "--no-progress"], env=env, stderr=open(log, "w"),
                                  stdout=subprocess.DEVNULL) for folder, log in zip(folders, logs)]
        deadline = time.monotonic() + 300
        while not all("waiting for another process that is writing the gallery" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "the processes never waited for the gallery's lock"
            time.sleep(0.1)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text() for log in logs]
    assert sorted(load_gallery(out).names) == ["s31", "s32", "s33"]


def test_a_gallery_with_flipped_bytes_is_refused_in_one_line(tmp_path):
    g = new_gallery(np.ones((4, 8), np.float32), np.array([0, 0, 1, 1]), ["a", "b"], ["1", "2", "3", "4"],
                    score="cosine", model="m", probe_embedding=np.ones(8, np.float32), preprocess={},
                    calibration=None)
    path = save_gallery(g, tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(np.ones(8, np.float32).tobytes())  # inside the embeddings' bytes
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(SiamkitError, match=rf"^{path} is damaged: its part 'embeddings.npy' fails the zip's "
                                           r"checksum"):
        load_gallery(tmp_path)


def test_enroll_with_an_exported_model_as_with_its_run(trained_run, onnx_file, att_faces, tmp_path, capsys):
    from siamkit.cli import main

    folder = people(tmp_path / "g", att_faces, ["s31", "s32"], range(1, 4))
    for model, out in ((onnx_file, tmp_path / "by_onnx"), (trained_run, tmp_path / "by_run")):
        assert main(["enroll", str(model), "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    by_onnx, by_run = load_gallery(tmp_path / "by_onnx"), load_gallery(tmp_path / "by_run")
    assert by_onnx.names == by_run.names == ["s31", "s32"]
    # The export's own parity limit (export.PARITY_TOLERANCE): the ONNX graph and PyTorch embed alike to 1e-4.
    np.testing.assert_allclose(by_onnx.embeddings, by_run.embeddings, atol=1e-4)
    assert main(["identify", str(tmp_path / "by_onnx"), str(att_faces / "s31" / "9.pgm"), "--threshold", "0.5"]) == 0


def test_identify_on_a_gallery_of_another_dimension_is_one_line(trained_run, att_faces, tmp_path, capsys):
    # On main 935a11e a gallery whose embeddings had another dimension than the model's (its probe embedding, from
    # which the model is recognised, intact) reached the search: a matmul ValueError and a traceback.
    from siamkit.cli import main

    folder = people(tmp_path / "g", att_faces, ["s31", "s32"], range(1, 3))
    out = tmp_path / "gallery"
    assert main(["enroll", str(trained_run), "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    g = load_gallery(out)
    save_gallery(new_gallery(g.embeddings[:, :16], g.labels, g.names, g.paths, score=g.score, model=g.meta["model"],
                             probe_embedding=np.asarray(g.meta["model_probe"]), preprocess=g.meta["preprocess"],
                             calibration=g.meta["calibration"]), out)
    capsys.readouterr()
    assert main(["identify", str(out), str(att_faces / "s31" / "9.pgm"), "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("siamkit: error: this gallery holds embeddings of dimension 16, and ") and err.count("\n") == 1
    assert "makes embeddings of dimension 128; enroll the gallery again with this model" in err
