"""Property (hypothesis): whatever the arguments, a command changes no file outside its intended output, and never
one of its inputs.

Command lines of train / evaluate / verify / embed / enroll / identify / export / align are drawn over existing and
missing paths of a small workspace (the data, a trained run and its checkpoints, the working directory, the user's
own files and folders, a gallery, a pairs file) with and without --force. Each runs in this process
(``siamkit.cli.main``) in a fresh copy of the workspace; every file and folder of it (path, kind, sha256) is
snapshot before and after. Whether the command succeeds or refuses is not the question here; what it may touch is:
- train: its --out folder (--force may replace only a run siamkit made there); evaluate: its --out folder, or the
  run's eval/, and with --calibrate the run's calibration.json; verify / embed / export: the --out file (and an
  export's sidecar); enroll: the --out folder; align: DST; identify: nothing.
- the --data folder, the run's checkpoints (unless train replaces the run it names as --out), the --config and
  --pairs files never change, even when named as the output.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from siamkit import cli
from tiny_run import BACKBONE, one_torch_thread  # noqa: F401

TINY_TRAIN = ["--steps", "1", "--image-size", "32", "32", "--batch-size", "4", "--backbone", BACKBONE,
              "--val-identities", "0", "--device", "cpu", "--no-progress", "--recipe", "none", "--cpu-tuning", "off",
              "--checkpoint-every", "1", "--log-every", "1"]
# Paths of the workspace (see `workspace`), existing and not, relative to the working directory.
PATHS = [".", "data", "data/s1", "data/s1/1.pgm", "run", "run/checkpoints", "run/checkpoints/last.pt",
         "run/config.json", "run/eval", "notes.txt", "photo.pgm", "pairs.csv", "empty", "mine", "gallery",
         "gallery/gallery.npz", "new", "new.npz", "new.pt", "new.csv", "data/new.npz", "run/checkpoints/new.pt",
         "mine/new.pt", "run/model.pt"]
paths = st.sampled_from(PATHS)
models = st.sampled_from(["run", "run/checkpoints/last.pt"]) | paths
force = st.lists(st.sampled_from(["--force"]), max_size=1)


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["train", "evaluate", "verify", "embed", "enroll", "identify", "export", "align"]))
    if command == "train":
        extra = draw(st.lists(st.sampled_from(["--force", "--overwrite", "--resume"]), max_size=1, unique=True))
        config = draw(st.sampled_from([[], ["--config", "run/config.json"]]))
        return ["train", "--data", draw(st.sampled_from(["data", "data/s1"]) | paths), "--out", draw(paths), *config,
                *extra, *TINY_TRAIN]
    if command == "evaluate":
        out = draw(st.sampled_from([[], ["--out", draw(paths)]]))
        calibrate = draw(st.sampled_from([[], ["--calibrate"]]))
        return ["evaluate", draw(models), "--data", draw(st.just("data") | paths), "--device", "cpu",
                "--cache-dir", "none", *out, *calibrate, *draw(force)]
    if command == "verify":
        if draw(st.booleans()):
            return ["verify", draw(models), draw(paths), draw(paths), "--threshold", "0.5"]
        return ["verify", draw(models), "--pairs", draw(st.just("pairs.csv") | paths), "--out", draw(paths),
                "--threshold", "0.5", *draw(force)]
    if command == "embed":
        return ["embed", draw(models), "--data", draw(st.just("data") | paths), "--out", draw(paths), "--device", "cpu",
                "--cache-dir", "none", *draw(force)]
    if command == "enroll":
        mode = draw(st.sampled_from([[], ["--add"], ["--force"], ["--remove", "s1"]]))
        return ["enroll", draw(models), "--data", draw(st.just("data") | paths), "--out", draw(paths), "--no-progress",
                *mode]
    if command == "identify":
        return ["identify", draw(paths), draw(paths), "--threshold", "0.5"]
    if command == "export":
        # TorchScript: the ownership rules are the format's own check and outputs.py, the same for ONNX (whose
        # exporter takes seconds per call); ONNX names are drawn as well, and refused for this format.
        return ["export", draw(models), "--format", "torchscript", "--out", draw(paths | st.just("new.onnx")),
                "--data", "data", *draw(force)]
    return ["align", draw(paths), draw(paths), "--workers", "1", "--no-progress", *draw(force)]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (not following links): a file's sha256, "dir" or "link -> target"."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _norm(path: str | None) -> str | None:
    return None if path is None else os.path.normpath(path)


def intended_outputs(argv: list[str]) -> list[str]:
    """What the command may change (relative, normalised); each entry covers everything below it."""
    command = argv[0]
    if command in ("train", "verify", "embed", "enroll"):
        out = [_option(argv, "--out")]
    elif command == "export":
        out = [_option(argv, "--out"), _option(argv, "--out") + ".json"]
    elif command == "align":
        out = [argv[2]]
    elif command == "evaluate":
        model = Path(argv[1])
        run_dir = model if model.is_dir() else (model.parent.parent if model.parent.name == "checkpoints"
                                                else model.parent)
        out = [_option(argv, "--out") or str(run_dir / "eval")]
        if "--calibrate" in argv:
            out += [str(run_dir / "calibration.json"), str(run_dir / ".calibration.json.lock")]
    else:
        out = []
    return [_norm(p) for p in out if p is not None]


def protected_inputs(argv: list[str]) -> list[str]:
    """What the command must never change, even when it is also named as the output."""
    command = argv[0]
    inputs = [_option(argv, "--data"), _option(argv, "--pairs")]
    if command == "train":
        # The run named as --out may be replaced (--force) or continued (--resume, which records its options in
        # the run's config.json); an input it is not.
        out = _norm(_option(argv, "--out"))
        inputs += ["run/checkpoints"] if out not in ("run", "run/checkpoints") else []
        config = _option(argv, "--config")
        inputs += [config] if config and not ("--resume" in argv and under(_norm(config), out)) else []
    else:
        inputs += ["run/checkpoints", "run/config.json"]
        if command == "align":
            inputs.append(argv[1])
    return [_norm(p) for p in inputs if p is not None]


def under(path: str, folder: str) -> bool:
    return folder == "." or path == folder or path.startswith(folder + os.sep)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, att_faces, one_torch_thread) -> Path:
    """The template copied for every example: data (copies, never links to the shared data), a trained run, a
    gallery, the user's own files."""
    root = tmp_path_factory.mktemp("workspace")
    for person in ("s1", "s2", "s3"):
        (root / "data" / person).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(att_faces / person / f"{i}.pgm", root / "data" / person / f"{i}.pgm")
    shutil.copy(att_faces / "s4" / "1.pgm", root / "photo.pgm")
    (root / "notes.txt").write_text("the user's notes")
    (root / "pairs.csv").write_text("data/s1/1.pgm,data/s2/1.pgm\n")
    (root / "empty").mkdir()
    (root / "mine").mkdir()
    (root / "mine" / "letter.txt").write_text("mine")
    with _in(root):
        assert cli.main(["train", "--data", "data", "--out", "run", *TINY_TRAIN]) == 0
        assert cli.main(["enroll", "run", "--data", "data", "--out", "gallery", "--no-progress"]) == 0
    return root


@contextlib.contextmanager
def _in(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.chdir(before)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=command_lines())
# The cases of issue 28 that destroyed files on main 935a11e, always among the examples, and two that succeed.
@example(argv=["train", "--data", "data", "--out", ".", "--overwrite", *TINY_TRAIN])
@example(argv=["train", "--data", "data", "--out", "data", "--overwrite", *TINY_TRAIN])
@example(argv=["train", "--data", "data", "--out", "mine", "--overwrite", *TINY_TRAIN])
@example(argv=["export", "run", "--format", "torchscript", "--out", "run/checkpoints/last.pt", "--data", "data"])
@example(argv=["embed", "run", "--data", "data", "--out", "gallery/gallery.npz", "--device", "cpu"])
@example(argv=["verify", "run", "--pairs", "pairs.csv", "--out", "pairs.csv", "--threshold", "0.5", "--force"])
@example(argv=["train", "--data", "data", "--out", "run", "--force", *TINY_TRAIN])
@example(argv=["enroll", "run", "--data", "data", "--out", "gallery", "--add", "--no-progress"])
def test_no_command_changes_a_file_outside_its_output(workspace, tmp_path_factory, argv):
    work = tmp_path_factory.mktemp("example") / "work"
    shutil.copytree(workspace, work, symlinks=True)
    before = snapshot(work)
    with _in(work):
        outputs, inputs = intended_outputs(argv), protected_inputs(argv)  # paths relative to the workspace
        try:
            cli.main(argv)
        except SystemExit:
            pass
    after = snapshot(work)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    outside = [p for p in changed if not any(under(p, o) for o in outputs)]
    assert outside == [], f"siamkit {' '.join(argv)} changed {outside}"
    touched_inputs = [p for p in changed if any(under(p, i) for i in inputs)]
    assert touched_inputs == [], f"siamkit {' '.join(argv)} changed its inputs {touched_inputs}"
    shutil.rmtree(work.parent)
