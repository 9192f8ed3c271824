"""End to end through the command line: train on real faces, evaluate, verify, embed; bad input."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from conftest import tree_snapshot

REPORT_KEYS = {
    "n_pairs", "n_genuine", "n_impostor", "roc_auc", "eer", "tar_at_far", "accuracy_mean", "accuracy_std",
    "threshold", "score", "baseline", "thresholds_at_far",
    "baseline_dlib",  # the off-the-shelf dlib model on the same pairs (.[test] installs the align extra)
}
# --recipe none: these tests exercise the plain options on small budgets, not the faces recipe.
FAST = ["--image-size", "32", "32", "--batch-size", "8", "--no-progress", "--recipe", "none"]


@pytest.fixture(scope="module")
def att_run(att_split, tmp_path_factory):
    """A short real training run on AT&T s1-s30 (6 identities held out by the default)."""
    train_dir, _ = att_split
    out = tmp_path_factory.mktemp("runs") / "att"
    from conftest import run_cli

    result = run_cli("train", "--data", str(train_dir), "--out", str(out), "--steps", "30", *FAST)
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_writes_the_run_folder(att_run):
    out, result = att_run
    assert (out / "config.json").is_file() and (out / "metrics.csv").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["report.json", "roc.png", "scores.png"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    # 6 held-out identities x 10 images: 6*45 = 270 genuine pairs and as many impostors.
    assert report["n_genuine"] == 270 and report["n_impostor"] == 270
    assert 0.5 < report["roc_auc"] <= 1.0  # 30 steps already beat chance on unseen people
    assert report["baseline_dlib"]["n_images"] == 60 and "dlib:" in result.stdout  # the second baseline
    assert "accuracy" in result.stdout and "held-out" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 30 and config["bn_policy"] == "joint" and "siamkit_version" in config
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and rows[-1].startswith("30,")


def test_evaluate_on_unseen_people(att_run, att_split, cli, tmp_path):
    out, _ = att_run
    _, test_dir = att_split
    result = cli("evaluate", str(out), "--data", str(test_dir), "--out", str(tmp_path / "ev"), "--flip")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n_genuine"] == 450 and report["n_impostor"] == 450  # 10 people x C(10, 2) genuine pairs
    assert report["score"] == "cosine"
    assert 0.5 < report["accuracy_mean"] <= 1.0


def test_evaluate_with_a_pairs_file(att_run, att_split, cli, tmp_path):
    """LFW pairs.txt over an AT&T-style folder renamed to LFW's <name>/<name>_0001.pgm layout."""
    out, _ = att_run
    _, test_dir = att_split
    lfw = tmp_path / "lfw"
    for person in sorted(test_dir.iterdir()):
        (lfw / person.name).mkdir(parents=True)
        for i in range(1, 11):
            (lfw / person.name / f"{person.name}_{i:04d}.pgm").symlink_to((person / f"{i}.pgm").resolve())
    lines = ["2\t3", "s31\t1\t2", "s32\t3\t4", "s33\t5\t6", "s31\t1\ts32\t1", "s33\t2\ts34\t2", "s35\t3\ts36\t3",
             "s37\t1\t2", "s38\t3\t4", "s39\t5\t6", "s37\t1\ts38\t1", "s39\t2\ts40\t2", "s35\t4\ts31\t4"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    result = cli("evaluate", str(out), "--data", str(lfw), "--pairs", str(tmp_path / "pairs.txt"),
                 "--out", str(tmp_path / "ev"))
    # Two sets give two folds: the report still has every key.
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n_pairs"] == 12 and report["n_genuine"] == 6


def test_verify_prints_score_threshold_and_decision(att_run, att_faces, cli):
    out, _ = att_run
    same = cli("verify", str(out), str(att_faces / "s35" / "1.pgm"), str(att_faces / "s35" / "2.pgm"))
    assert same.returncode == 0, same.stderr
    words = same.stdout.split()
    assert words[0] == "score" and words[2] == "threshold" and words[4] in ("SAME", "DIFFERENT")
    score, threshold = float(words[1]), float(words[3])
    assert (words[4] == "SAME") == (score >= threshold)
    # The threshold is the one calibrated on the held-out identities at the end of training.
    report = json.loads((out / "eval" / "report.json").read_text())
    assert threshold == pytest.approx(report["threshold"], abs=1e-4)
    forced = cli("verify", str(out), str(att_faces / "s35" / "1.pgm"), str(att_faces / "s36" / "1.pgm"), "--threshold", "1")
    # 1, the top of the cosine's range: only the same embedding reaches it (2 is refused: tests/test_calibration.py)
    assert forced.returncode == 0 and forced.stdout.split()[4] == "DIFFERENT"


def test_embed_writes_npz(att_run, att_split, cli, tmp_path):
    out, _ = att_run
    _, test_dir = att_split
    result = cli("embed", str(out), "--data", str(test_dir), "--out", str(tmp_path / "e.npz"))
    assert result.returncode == 0, result.stderr
    z = np.load(tmp_path / "e.npz")
    assert z["embeddings"].shape == (100, 128)
    np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, rtol=1e-5)  # l2 head
    assert list(np.bincount(z["labels"])) == [10] * 10
    assert z["paths"][0] == "s31/1.pgm" and list(z["names"][:2]) == ["s31", "s32"]


def test_python_api_agrees_with_the_cli(att_run, att_faces):
    import siamkit

    out, _ = att_run
    v = siamkit.load(out)
    a, b, c = (str(att_faces / p) for p in ("s35/1.pgm", "s35/2.pgm", "s36/1.pgm"))
    emb = v.embed([a, b, c])
    assert emb.shape == (3, 128)
    assert v.score(a, b) == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
    scores = v.score([a, a], [b, c])
    assert scores.shape == (2,)
    assert v.verify(a, b) == (v.score(a, b) >= v.threshold)
    from PIL import Image

    assert v.score(Image.open(a), np.asarray(Image.open(b))) == pytest.approx(v.score(a, b), abs=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "vgg99"], "invalid choice"),
        (["--loss", "magic"], "invalid choice"),
        (["--margin", "-1"], "--margin must be positive"),
        (["--batch-size", "0"], "--batch-size must be a positive number"),
        (["--image-size", "0", "0"], "--image-size"),
        (["--identities-per-batch", "4"], "PK batches need both"),
        (["--mining", "batch-hard"], "--mining needs PK batches"),
        (["--val-identities", "9"], "holds out 9 of 10 identities"),
        (["--pretrained", "/nonexistent/weights.pth"], "no such file"),
        (["--data", "/nonexistent/faces"], "does not exist"),
    ],
)
def test_bad_train_options_fail_with_one_line_and_write_nothing(args, message, tmp_path, capsys):
    from siamkit.cli import main

    out = tmp_path / "run"
    # digits (10 identities) as before the built-in faces became the default data
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "1", *FAST, *args]) == 2  # in-process
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("siamkit: error:")
    assert not out.exists()


def test_data_folder_problems(cli, tmp_path, att_faces):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("train", "--data", str(empty), "--out", str(tmp_path / "r1"), *FAST)
    assert r.returncode == 2 and "no identity sub-folders with images" in r.stderr and not (tmp_path / "r1").exists()
    one = tmp_path / "one"
    (one / "s1").mkdir(parents=True)
    (one / "s1" / "1.pgm").symlink_to(att_faces / "s1" / "1.pgm")
    (one / "s1" / "2.pgm").symlink_to(att_faces / "s1" / "2.pgm")
    r = cli("train", "--data", str(one), "--out", str(tmp_path / "r2"), "--val-identities", "0", *FAST)
    assert r.returncode == 2 and "at least 2 identities" in r.stderr and not (tmp_path / "r2").exists()


def test_existing_run_folder_is_refused(att_run, cli):
    out, _ = att_run
    before = tree_snapshot(out)
    r = cli("train", "--out", str(out), "--steps", "1", *FAST)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert tree_snapshot(out) == before


def test_verify_and_evaluate_input_errors(att_run, cli, tmp_path, att_faces):
    out, _ = att_run
    r = cli("verify", str(out), str(tmp_path / "missing.jpg"), str(att_faces / "s1" / "1.pgm"))
    assert r.returncode == 2 and "missing.jpg" in r.stderr and "Traceback" not in r.stderr
    r = cli("evaluate", str(tmp_path / "norun"), "--data", str(att_faces))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "bad_pairs.txt").write_text("10\t300\nnot a pair line\n")
    r = cli("evaluate", str(out), "--data", str(att_faces), "--pairs", str(tmp_path / "bad_pairs.txt"),
            "--out", str(tmp_path / "ev"))
    assert r.returncode == 2 and "bad_pairs.txt" in r.stderr and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("flip, shifts", [(True, False), (False, True)])
def test_a_run_evaluated_with_more_views_verifies_with_them(tmp_path, flip, shifts):
    """The threshold of a run with --eval-flip (--eval-shifts) was calibrated on embeddings averaged with the mirror
    image's (the four shifted copies'): load() embeds the same way."""
    import siamkit
    from siamkit.eval.embed import embed_images
    from siamkit.train.loop import train
    from tiny_run import tiny_config

    train(tiny_config(tmp_path / "run", steps=1, val_identities=0, eval_flip=flip, eval_shifts=shifts),
          progress=False)
    v = siamkit.load(tmp_path / "run")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = torch.stack([v._to_uint8(im) for im in images])
    views = embed_images(v.model, batch, v.preprocess, "cpu", flip=flip, shifts=shifts)
    plain = embed_images(v.model, batch, v.preprocess, "cpu", flip=False, shifts=shifts)
    assert (v.flip, v.shifts) == (flip, shifts) and np.array_equal(v.embed(list(images)), views)
    assert np.array_equal(v.embed(list(images), flip=False), plain)
    assert not np.array_equal(views, embed_images(v.model, batch, v.preprocess, "cpu"))


def test_a_switch_the_recipe_turns_on_can_be_turned_off():
    """The faces recipe (the built-in faces' default) evaluates with flips and shifts; --no-eval-shifts and
    --no-eval-flip turn them off, and --eval-shifts turns the switch on under --recipe none."""
    from siamkit.cli import parse_args

    assert (parse_args(["train"]).eval_flip, parse_args(["train"]).eval_shifts) == (True, True)
    args = parse_args(["train", "--no-eval-shifts", "--no-eval-flip"])
    assert (args.eval_flip, args.eval_shifts) == (False, False)
    args = parse_args(["train", "--recipe", "none", "--eval-shifts"])
    assert (args.eval_flip, args.eval_shifts) == (False, True)
    assert parse_args(["train", "--no-channels-last"]).channels_last is False  # a flag of its own stays as it was


def test_a_closed_pipe_ends_quietly():
    """`siamkit verify ... | head -1`: the reader leaving is not a file error; no message, SIGPIPE's status."""
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import sys, siamkit.cli as cli, siamkit.commands.verify as verify\n"
        "def closed(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
        "verify.run = closed\n"
        "sys.exit(cli.main(['verify', 'RUN', 'a.png', 'b.png']))\n"
    )
    env_path = str(REPO / "src")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 141
    assert done.stderr == ""
