"""Calibrated thresholds: which one verify uses (calibration.py), evaluate --calibrate, verify --far / --pairs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from siamkit.calibration import (TRAINING_SOURCE, calibration_entry, choose_threshold, far_key, record_calibration,
                                 run_calibration)
from siamkit.errors import SiamkitError
from siamkit.eval.verification import pair_scores
from tiny_run import one_torch_thread, tiny_config  # noqa: F401 (fixture)

AT_FAR = {"1e-1": {"threshold": 0.3, "far": 0.1, "tar": 0.9, "n_impostor": 100, "supported": True},
          "1e-2": {"threshold": 0.6, "far": 0.01, "tar": 0.5, "n_impostor": 100, "supported": False}}


def report(threshold: float) -> dict:
    return {"score": "cosine", "n_pairs": 200, "n_impostor": 100, "threshold": threshold, "thresholds_at_far": AT_FAR}


def test_choose_threshold():
    cal = calibration_entry(report(0.25), "my people")
    assert choose_threshold(cal) == (0.25, "accuracy-maximising threshold, calibrated on my people")
    assert choose_threshold(cal, 1e-1)[0] == 0.3
    t, what = choose_threshold(cal, 0.01)
    assert t == 0.6 and "too few impostor pairs (100)" in what
    with pytest.raises(SiamkitError, match=r"no threshold calibrated at FAR 0.001 \(calibrated: 1e-1, 1e-2\)"):
        choose_threshold(cal, 1e-3)
    with pytest.raises(SiamkitError, match="no calibrated threshold"):
        choose_threshold(None)
    assert [far_key(f) for f in (1e-1, 1e-2, 1e-3, 0.05)] == ["1e-1", "1e-2", "1e-3", "5e-2"]


def test_record_keeps_the_history(tmp_path):
    training = run_calibration(tmp_path, {"threshold": 0.2, "thresholds_at_far": AT_FAR})
    assert training["source"] == TRAINING_SOURCE and training["threshold"] == 0.2
    assert run_calibration(tmp_path, {}) is None  # no file, no threshold in the checkpoint
    first, second = calibration_entry(report(0.4), "a"), calibration_entry(report(0.5), "b")
    record_calibration(tmp_path, first, previous=training)
    record_calibration(tmp_path, second, previous=training)  # the file exists now: previous is not added again
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["current"] == second and saved["history"] == [training, first]
    assert run_calibration(tmp_path, {"threshold": 0.2}) == second  # the file wins over the checkpoint
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(SiamkitError, match="calibration.json is not a readable calibration"):
        run_calibration(tmp_path, {})


@pytest.fixture(scope="module")
def held_out_run(att_split, tmp_path_factory):
    """A tiny run on AT&T s1-s30 with 6 identities held out: the training calibrates its thresholds on them."""
    from siamkit.train.loop import train

    out = tmp_path_factory.mktemp("cal") / "run"
    train(tiny_config(out, data=str(att_split[0]), steps=3, val_identities=6), progress=False)
    return out


def test_training_stores_thresholds_at_far_and_verify_uses_them(held_out_run, att_faces, capsys):
    import siamkit
    from siamkit.cli import main

    report = json.loads((held_out_run / "eval" / "report.json").read_text())
    v = siamkit.load(held_out_run)
    assert v.calibration["thresholds_at_far"] == report["thresholds_at_far"]
    a, b = str(att_faces / "s35" / "1.pgm"), str(att_faces / "s36" / "1.pgm")
    s = v.score(a, b)
    for key, t in report["thresholds_at_far"].items():
        assert v.threshold_for(float(key)) == t["threshold"]
        assert v.verify(a, b, far=float(key)) == (s >= t["threshold"])
        assert main(["verify", str(held_out_run), a, b, "--far", key]) == 0
        first, second = capsys.readouterr().out.splitlines()
        assert float(first.split()[3]) == pytest.approx(t["threshold"], abs=5e-5)  # printed with 4 decimals
        assert second.startswith(f"threshold: threshold at FAR {key}, calibrated on {TRAINING_SOURCE}")
    with pytest.raises(SiamkitError, match="threshold= and far= both choose the threshold: pass only one of them"):
        v.verify(a, b, threshold=0.5, far=1e-1)


def test_evaluate_calibrate_then_verify_says_which(held_out_run, att_split, att_faces, tmp_path, capsys):
    from siamkit.cli import main

    assert main(["evaluate", str(held_out_run), "--data", str(att_split[1]), "--out", str(tmp_path / "ev"),
                 "--calibrate"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    saved = json.loads((held_out_run / "calibration.json").read_text())
    assert saved["current"]["threshold"] == report["threshold"]
    assert saved["current"]["thresholds_at_far"] == report["thresholds_at_far"]
    assert saved["history"][0]["source"] == TRAINING_SOURCE  # the training's thresholds are kept
    a, b = str(att_faces / "s35" / "1.pgm"), str(att_faces / "s35" / "2.pgm")
    assert main(["verify", str(held_out_run), a, b]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert float(first.split()[3]) == pytest.approx(report["threshold"], abs=5e-5)
    assert str(att_split[1]) in second and "evaluate --calibrate" in second
    # Thresholds for another score than the run's would not fit verify's scores: refused, nothing changed.
    before = (held_out_run / "calibration.json").read_bytes()
    assert main(["evaluate", str(held_out_run), "--data", str(att_split[1]), "--out", str(tmp_path / "ev2"),
                 "--calibrate", "--score", "euclidean"]) == 2
    assert "drop those options" in capsys.readouterr().err
    # So would thresholds for other views than the run's (it was evaluated without shifted copies).
    assert main(["evaluate", str(held_out_run), "--data", str(att_split[1]), "--out", str(tmp_path / "ev2"),
                 "--calibrate", "--shifts"]) == 2
    assert "--flip and --shifts; drop those options" in capsys.readouterr().err
    assert (held_out_run / "calibration.json").read_bytes() == before and not (tmp_path / "ev2").exists()


def test_verify_pairs_csv_embeds_each_image_once(held_out_run, att_faces, tmp_path, capsys, monkeypatch):
    import siamkit
    from siamkit.api import Verifier
    from siamkit.cli import main

    images = [att_faces / f"s{p}" / f"{i}.pgm" for p in (31, 32) for i in (1, 2)]
    rows = [(images[0], images[1]), (images[0], images[2]), (images[3], images[1]), (images[2], images[3])]
    (tmp_path / "pairs.csv").write_text("image1,image2\n" + "".join(f"{a},{b}\n" for a, b in rows))
    embedded = []
    real_embed = Verifier.embed
    monkeypatch.setattr(Verifier, "embed", lambda self, ims, flip=None: embedded.extend(ims) or real_embed(self, ims, flip))
    assert main(["verify", str(held_out_run), "--pairs", str(tmp_path / "pairs.csv"), "--out",
                 str(tmp_path / "d.csv"), "--threshold", "0.5"]) == 0
    assert sorted(map(str, embedded)) == sorted(map(str, images))  # 4 images for 8 pair sides
    assert "4 pairs (4 images, each embedded once)" in capsys.readouterr().out
    with open(tmp_path / "d.csv", newline="") as f:
        got = list(csv.DictReader(f))
    monkeypatch.undo()
    v = siamkit.load(held_out_run)
    emb = v.embed([str(p) for p in images])
    index = {p: i for i, p in enumerate(images)}
    expected = pair_scores(emb[[index[a] for a, _ in rows]], emb[[index[b] for _, b in rows]], "cosine")
    assert [(r["image1"], r["image2"]) for r in got] == [(str(a), str(b)) for a, b in rows]
    np.testing.assert_allclose([float(r["score"]) for r in got], expected, atol=1e-8)  # written with 8 decimals
    assert [r["decision"] for r in got] == ["same" if s >= 0.5 else "different" for s in expected]
    assert {r["threshold"] for r in got} == {"0.50000000"}


@pytest.mark.parametrize("content, message", [
    ("a.pgm\n", "row 1 has 1 field(s)"),
    ("", "holds no pairs"),
    ("missing1.pgm,missing2.pgm\n", "2 image(s) named in"),
])
def test_bad_pairs_csv_is_one_line_and_writes_nothing(held_out_run, tmp_path, capsys, content, message):
    from siamkit.cli import main

    (tmp_path / "pairs.csv").write_text(content)
    assert main(["verify", str(held_out_run), "--pairs", str(tmp_path / "pairs.csv"), "--out",
                 str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "d.csv").exists()


# --- issue 28: every threshold checked, calibration checked before the report, Excel's CSVs ---------------------

def test_thresholds_must_be_finite_and_within_the_scores_range():
    from siamkit.calibration import check_threshold, pick_threshold

    for score, good in (("cosine", (-1.0, 0.0, 0.37, 1.0)), ("euclidean", (-1e6, -0.5, 0.0))):
        assert [check_threshold(t, score) for t in good] == list(good)
    bad = [("cosine", 5.0, r"--threshold 5 is outside the cosine score's range \[-1, 1\]: every pair would be different"),
           ("cosine", -1.5, r"outside the cosine score's range \[-1, 1\]: every pair would be same"),
           ("euclidean", 0.5, r"--threshold 0.5 is outside the euclidean score's range at most 0 \(minus a distance\)"),
           ("cosine", float("nan"), "--threshold nan is not a finite number"),
           ("euclidean", float("-inf"), "--threshold -inf is not a finite number")]
    for score, t, message in bad:
        with pytest.raises(SiamkitError, match=message):
            check_threshold(t, score)
    cal = calibration_entry(report(0.25), "my people")
    assert pick_threshold(cal, 0.5, None, "cosine") == (0.5, "given with --threshold")
    assert pick_threshold(cal, None, 0.1, "cosine")[0] == 0.3
    with pytest.raises(SiamkitError, match="--threshold and --far both choose the threshold: pass only one of them"):
        pick_threshold(cal, 0.5, 0.1, "cosine")
    for far in (0.0, 1.0, float("nan")):
        with pytest.raises(SiamkitError, match=f"--far {far} is not a false-accept rate"):
            pick_threshold(cal, None, far, "cosine")


def test_verify_refuses_a_threshold_the_score_cannot_reach(held_out_run, att_faces, capsys):
    import siamkit
    from siamkit.cli import main

    a, b = str(att_faces / "s31" / "1.pgm"), str(att_faces / "s32" / "1.pgm")
    for t, message in (("nan", "--threshold nan is not a finite number"),
                       ("5", "--threshold 5 is outside the cosine score's range [-1, 1]")):
        assert main(["verify", str(held_out_run), a, b, "--threshold", t]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    with pytest.raises(SiamkitError, match=r"threshold= 5 is outside the cosine score's range"):
        siamkit.load(held_out_run).verify(a, b, threshold=5)


def test_calibrate_checks_the_run_before_writing_a_report(held_out_run, att_split, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    from siamkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(held_out_run, run)
    (run / "calibration.json").write_text("{ damaged")
    args = ["evaluate", str(run), "--data", str(att_split[1]), "--out", str(tmp_path / "ev"), "--calibrate"]
    assert main(args) == 2
    assert "is not a readable calibration" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()  # no report of a calibration that could not be stored
    (run / "calibration.json").unlink()

    def read_only(*a, **k):  # what a read-only file system answers (root ignores permission bits, so simulated)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("siamkit.calibration.tempfile.TemporaryFile", read_only)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--calibrate writes {run / 'calibration.json'}, but {run} is not writable (Read-only file system)" in err
    assert not (tmp_path / "ev").exists() and not (run / "calibration.json").exists()


def test_a_pairs_csv_saved_by_excel_keeps_its_header(held_out_run, att_faces, tmp_path, capsys):
    from siamkit.cli import main

    a, b = att_faces / "s31" / "1.pgm", att_faces / "s31" / "2.pgm"
    # Excel's "CSV UTF-8 (Comma delimited)": a byte-order mark, then the header row, CRLF line ends
    (tmp_path / "pairs.csv").write_text(f"image1,image2\r\n{a},{b}\r\n", encoding="utf-8-sig", newline="")
    assert main(["verify", str(held_out_run), "--pairs", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "d.csv"),
                 "--threshold", "0.5"]) == 0, capsys.readouterr().err
    assert "1 pairs (2 images, each embedded once)" in capsys.readouterr().out
