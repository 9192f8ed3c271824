"""The second baseline: the off-the-shelf dlib model on a report's own pairs, or the reason it is skipped."""
from __future__ import annotations

import json

import numpy as np
import pytest

from siamkit.data.sources import load_source, default_preprocess
from siamkit.data.sources import IdentityDataset
from siamkit.eval.dlib_baseline import dlib_baseline, dlib_identification_baseline
from siamkit.eval.identification import format_identification, identification_report
from siamkit.eval.protocol import evaluate, pairs_for
from siamkit.eval.report import format_summary
from siamkit.eval.verification import pair_scores, verification_report
from siamkit.faces.folder import AlignOptions

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def four_people():
    """AT&T s31-s34 (the built-in att-test's first 40 images), decoded as the main job decodes them: 64x64 grey."""
    ds = load_source("att-test", default_preprocess("att-test"))
    return ds.subset(np.arange(4))


def test_baseline_is_the_builtin_model_on_the_same_pairs(four_people):
    import siamkit
    from siamkit.data.sources import native_preprocess

    pairs = pairs_for(four_people, None, seed=0)
    got = dlib_baseline(four_people, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold)
    # independently: siamkit.load("dlib") on the original 92x112 images (each detected and cut again, one by one)
    native = load_source("att-test", native_preprocess("att-test")).subset(np.arange(4))
    verifier = siamkit.load("dlib")
    emb = verifier.embed([im for im in native.images])
    scores = pair_scores(emb[pairs.idx_a], emb[pairs.idx_b], "euclidean")
    expected = verification_report(scores, pairs.same, pairs.fold, "euclidean")
    assert got["n_images"] == 40 and got["n_without_detection"] == 0
    # the same chips and network: every pair decided alike, so the fold accuracies agree exactly
    assert got["accuracy_mean"] == pytest.approx(expected["accuracy_mean"], abs=1e-12)
    assert got["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)


def _images(ds, index: np.ndarray, n_names: int) -> IdentityDataset:
    import torch

    return IdentityDataset(ds.images[torch.from_numpy(index)], ds.labels[index], ds.names[:n_names],
                           [ds.paths[i] for i in index], ds.root)


def test_identification_baseline_is_the_builtin_model_searching_the_same_gallery(four_people):
    """Gallery: images 0-4 of s31-s33; probes: images 5-9 of s31-s34 (s34's five are the unknowns)."""
    import siamkit
    from siamkit.data.sources import native_preprocess

    n = len(four_people)
    in_gallery = np.array([i for i in range(n) if four_people.labels[i] < 3 and i % 10 < 5])
    probing = np.array([i for i in range(n) if i % 10 >= 5])
    gallery, probes = _images(four_people, in_gallery, 3), _images(four_people, probing, 4)
    probe_ids = np.where(probes.labels < 3, probes.labels, -1)
    got = dlib_identification_baseline(gallery, probes, probe_ids)
    assert got["n_images"] == 35 and got["n_without_detection"] == 0 and got["score"] == "euclidean"
    # independently: siamkit.load("dlib") on the original 92x112 images, and rank-1 by a loop over the probes
    native = load_source("att-test", native_preprocess("att-test")).subset(np.arange(4))
    emb = siamkit.load("dlib").embed([im for im in native.images])
    best = [max(range(3), key=lambda person: max(-np.linalg.norm(emb[p] - emb[g]) for g in in_gallery
                                                 if four_people.labels[g] == person))
            for p in probing[probe_ids >= 0]]
    # the same chips and network: every probe's best identity is the same, so rank-1 agrees exactly
    assert got["rank1"] == np.mean(np.array(best) == probe_ids[probe_ids >= 0])
    expected = identification_report(-np.linalg.norm(emb[probing][:, None] - emb[in_gallery][None], axis=2),
                                     gallery.labels, 3, probe_ids)
    # mAP ranks the 15 gallery images of each probe: the two paths' embeddings agree to float32 rounding, so the
    # rankings agree unless two distances tie that closely; 1e-9 is the float64 mean's rounding, not a model's
    assert got["map"] == pytest.approx(expected["map"], abs=1e-9)
    assert set(got["open_set"]) == set(expected["open_set"])
    report = {**expected, "baseline_dlib": got}
    assert format_identification(report).splitlines()[-1] == (
        f"dlib:      off-the-shelf dlib model, rank-1 {got['rank1']:.2%}, rank-5 {got['rank5']:.2%}, "
        f"mAP {got['map']:.4f} -> the model does not beat it (+0.0 rank-1 points)")


def test_it_leaves_torchs_random_state_as_it_found_it(four_people):
    """A run saves torch's random state after its held-out report for --resume (dropout draws from it next): the
    baseline, whose network is built with random weights before dlib's replace them, must not move it."""
    import torch

    pairs = pairs_for(four_people, None, seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dlib_baseline(four_people, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold)
    assert torch.equal(torch.get_rng_state(), before)


def test_evaluate_adds_it_and_the_summary_says_who_wins():
    from siamkit.data.pixels import Preprocess
    from siamkit.models.zoo import builtin_network

    # the report's model: dlib's network on whole AT&T frames resized to 150x150 (no chips), against dlib on chips
    model, ckpt = builtin_network("dlib")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    result = evaluate(model, pre, load_source("att-test", pre).subset(np.arange(4)), score="euclidean",
                      baseline_dlib=True)
    report = result.report
    assert set(report["baseline_dlib"]) >= {"accuracy_mean", "roc_auc", "eer", "tar_at_far"}
    line = format_summary(report).splitlines()[-1]
    gain = 100 * (report["accuracy_mean"] - report["baseline_dlib"]["accuracy_mean"])
    assert line.startswith("dlib:") and f"({gain:+.1f} points)" in line
    assert ("the model beats it" in line) == (gain > 0)
    assert "baseline_dlib" not in evaluate(model, pre, load_source("att-test", pre).subset(np.arange(2)),
                                           score="euclidean").report  # off unless asked


def test_skipped_for_112_px_crops_and_without_the_extra(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from siamkit.data.sources import load_folder

    root = tmp_path / "aligned"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        for k in range(2):
            Image.new("L", (112, 112), 40 * k).save(root / person / f"{k}.png")
    (root / "align_report.json").write_text(json.dumps({"alignment": AlignOptions().alignment()}))
    ds = load_folder(root, default_preprocess(str(root)))
    pairs = pairs_for(ds, None, seed=0)
    got = dlib_baseline(ds, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold)
    assert "112 px template" in got["skipped"] and "skipped" in caplog.text
    monkeypatch.setitem(__import__("sys").modules, "dlib", None)
    got = dlib_baseline(ds, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold)
    assert "align extra is not installed" in got["skipped"]
    assert format_summary({**_minimal_report(), "baseline_dlib": got}).splitlines()[-1].startswith(
        "dlib:      off-the-shelf dlib model not compared: the align extra")


def _minimal_report() -> dict:
    scores, same = np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])
    report = verification_report(scores, same, np.array([0, 1, 0, 1]), "cosine")
    return report
