"""Rerun issue 28's input cases (items 5-9: orientation, limits, values, file names, the smaller items) with the real
command line, and check that each meets its promise (docs/reliability-inputs.md).

    python scripts/fault_cases_inputs.py     # a table: case / result; exit code 1 if any case fails

``CASES`` is a list of (name, function); each function takes no argument, runs ``python -m siamkit ...`` in
processes of their own inside one temporary folder, and returns (ok, detail); the name says what is expected.
scripts/fault_cases.py imports this module and runs these cases beside its own. The temporary folder holds
everything: a copy of 4 people of the AT&T faces (found as the tests find them: $SIAMKIT_DATA or ../shared/data),
a tiny trained run, the decoded cache ($SIAMKIT_CACHE_DIR points there); it is removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SIAMKIT_DATA", REPO.parent / "shared" / "data"))
# resnet18: after two steps its embeddings still tell images apart (mobilenet_v3_small's all point one way)
TINY = ["--image-size", "32", "32", "--batch-size", "4", "--backbone", "resnet18", "--val-identities", "0",
        "--device", "cpu", "--recipe", "none", "--cpu-tuning", "off"]
Case = Callable[[], tuple[bool, str]]


class Result:
    """What one ``python -m siamkit`` process did: exit code, standard output and error (bytes: names may not be
    UTF-8), and its error line."""

    def __init__(self, done: subprocess.CompletedProcess):
        self.code, self.out, self.err = done.returncode, done.stdout, done.stderr
        lines = self.err.decode("utf-8", "backslashreplace").strip().splitlines()
        self.last = lines[-1] if lines else ""

    def one_error(self, expected: str) -> tuple[bool, str]:
        """Exit 2 with one 'siamkit: error:' line holding ``expected`` and no traceback."""
        errors = [line for line in self.err.decode("utf-8", "replace").splitlines() if "error" in line.lower()]
        ok = (self.code == 2 and len(errors) == 1 and self.last.startswith("siamkit: error: ") and expected in self.last
              and b"Traceback" not in self.err)
        return ok, f"exit {self.code}: {self.last[:160]}"

    def success(self, detail: str = "") -> tuple[bool, str]:
        ok = self.code == 0 and b"Traceback" not in self.err
        return ok, detail if ok else f"exit {self.code}: {self.last[:160]}"


def siamkit(*args, env: dict | None = None) -> Result:
    """``python -m siamkit ARGS`` in the workspace, on one thread, with this checkout's package first."""
    ws = workspace()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SIAMKIT_CACHE_DIR": str(ws / "cache"),
                "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    argv = [sys.executable, "-m", "siamkit", *(a if isinstance(a, bytes) else str(a) for a in args)]
    return Result(subprocess.run(argv, capture_output=True, cwd=ws, env=full_env, timeout=900))


@functools.lru_cache(maxsize=None)
def workspace() -> Path:
    """The temporary folder: 4 people x 3 AT&T faces in faces/, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="siamkit-fault-inputs-"))
    atexit.register(shutil.rmtree, root, True)
    for person in ("s1", "s2", "s3", "s4"):
        (root / "faces" / person).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(DATA / "att_faces" / person / f"{i}.pgm", root / "faces" / person / f"{i}.pgm")
    return root


@functools.lru_cache(maxsize=None)
def trained_run() -> Path:
    """A tiny run (2 steps) on the workspace's faces."""
    run = workspace() / "run"
    result = siamkit("train", "--data", workspace() / "faces", "--out", run, "--steps", "2", "--no-progress", *TINY)
    if result.code != 0:
        raise RuntimeError(f"the tiny run did not train: {result.last}")
    return run


@functools.lru_cache(maxsize=None)
def photos() -> Path:
    """upright.png (a real RGB face), phone.png (its pixels turned, with the EXIF tag to turn them back), dot.png."""
    from PIL import Image

    folder = workspace() / "photos" / "a"
    folder.mkdir(parents=True)
    face = Image.open(sorted((DATA / "rof_neutral" / "al_pacino").glob("*.jpg"))[0]).convert("RGB")
    face.save(folder / "upright.png")  # PNG: lossless, so decoding both must give the same pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    face.transpose(Image.Transpose.ROTATE_90).save(folder / "phone.png", exif=exif)
    Image.new("L", (1, 1), 128).save(workspace() / "photos" / "dot.png")
    return folder


# --- 5. orientation ------------------------------------------------------------------------------------------------

def sideways_photo_scores_as_upright() -> tuple[bool, str]:
    r = siamkit("verify", trained_run(), photos() / "upright.png", photos() / "phone.png", "--threshold", "0.5")
    return r.success(r.out.decode().splitlines()[0]) if r.code == 0 else r.success()


def sideways_photo_aligns_as_upright() -> tuple[bool, str]:
    import numpy as np
    from PIL import Image

    dst = workspace() / "aligned"
    r = siamkit("align", photos(), dst, "--size", "96", "--workers", "1", "--no-progress")
    if r.code != 0:
        return r.success()
    crops = [dst / "phone.png", dst / "upright.png"]
    if not all(p.is_file() for p in crops):
        return False, f"crops written: {sorted(p.name for p in dst.iterdir())}"
    same = np.array_equal(*(np.asarray(Image.open(p)) for p in crops))
    return same, "both aligned, the same crop" if same else "both aligned, but the crops differ"


# --- 6. limits -----------------------------------------------------------------------------------------------------

def nothing_left(*paths: Path) -> str:
    return ", ".join(str(p) for p in paths if p.exists())


def huge_image_size_refused() -> tuple[bool, str]:
    out, cache = workspace() / "huge", workspace() / "huge-cache"
    r = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--image-size", "100000", "100000",
                "--cache-dir", cache)
    ok, detail = r.one_error("--image-size takes sides of 8 to 1024 pixels, got 100000")
    left = nothing_left(out, cache)
    return ok and not left, detail + (f"; left behind: {left}" if left else "")


def huge_align_size_refused() -> tuple[bool, str]:
    dst = workspace() / "huge-aligned"
    r = siamkit("align", photos(), dst, "--size", "100000")
    ok, detail = r.one_error("--size takes sides of 8 to 1024 pixels, got 100000")
    return ok and not dst.exists(), detail + ("; DST created" if dst.exists() else "")


# --- 7. every value checked ----------------------------------------------------------------------------------------

def threshold_case(threshold: str, expected: str) -> Case:
    def case() -> tuple[bool, str]:
        image = workspace() / "faces" / "s1" / "1.pgm"
        return siamkit("verify", trained_run(), image, image, "--threshold", threshold).one_error(expected)
    return case


def identify_threshold_beside_far_refused() -> tuple[bool, str]:
    gallery = workspace() / "gallery"
    if not gallery.exists():
        siamkit("enroll", trained_run(), "--data", workspace() / "faces", "--out", gallery, "--no-progress")
    r = siamkit("identify", gallery, workspace() / "faces" / "s1" / "1.pgm", "--threshold", "0.5", "--far", "1e-1")
    return r.one_error("--threshold and --far both choose the threshold: pass only one of them")


def steps_beside_epochs_refused() -> tuple[bool, str]:
    out = workspace() / "steps-epochs"
    r = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "5", "--epochs", "2")
    ok, detail = r.one_error("--steps and --epochs both set the run's length: pass only one of them")
    return ok and not out.exists(), detail


def tiny_image_refused_by_verify() -> tuple[bool, str]:
    dot = workspace() / "photos" / "dot.png"
    photos()
    r = siamkit("verify", trained_run(), dot, workspace() / "faces" / "s1" / "1.pgm", "--threshold", "0.5")
    return r.one_error("1x1 pixels is too small to tell anyone apart")


# --- 8. any file-name bytes ----------------------------------------------------------------------------------------

def non_utf8_names_work() -> tuple[bool, str]:
    data = os.path.join(bytes(workspace()), b"names")
    for name, person in ((b"\xff\xfe", "s1"), (b"caf\xe9", "s2")):
        os.makedirs(os.path.join(data, name))
        for i in (1, 2, 3):
            shutil.copy(workspace() / "faces" / person / f"{i}.pgm", os.path.join(data, name, f"{i}.pgm".encode()))
    run, gallery = workspace() / "names-run", workspace() / "names-gallery"
    steps = [("train", "--data", data, "--out", run, "--steps", "1", "--no-progress", *TINY),
             ("evaluate", run, "--data", data, "--out", workspace() / "names-eval", "--device", "cpu"),
             ("enroll", run, "--data", data, "--out", gallery, "--no-progress"),
             ("identify", gallery, os.path.join(data, b"\xff\xfe", b"1.pgm"), "--threshold", "0.5")]
    for args in steps:
        # PYTHONIOENCODING=utf-8: standard output as strict as a UTF-8 terminal's
        r = siamkit(*args, env={"PYTHONIOENCODING": "utf-8"})
        if r.code != 0 or b"Traceback" in r.err:
            return False, f"{args[0]}: " + r.success()[1]
    return True, "train, evaluate, enroll and identify: exit 0, no traceback"


# --- 9. the smaller items ------------------------------------------------------------------------------------------

def excel_csv_keeps_its_header() -> tuple[bool, str]:
    a, b = workspace() / "faces" / "s1" / "1.pgm", workspace() / "faces" / "s1" / "2.pgm"
    csv = workspace() / "excel.csv"
    csv.write_text(f"image1,image2\r\n{a},{b}\r\n", encoding="utf-8-sig", newline="")
    r = siamkit("verify", trained_run(), "--pairs", csv, "--out", workspace() / "decisions.csv", "--threshold", "0.5")
    ok = r.code == 0 and b"1 pairs (2 images" in r.out
    return ok, "1 pair, header kept" if ok else r.success()[1]


def exported_model_named(kind: str) -> Case:
    def case() -> tuple[bool, str]:
        if kind == "TorchScript":
            path = workspace() / "model.pt"
            made = siamkit("export", trained_run(), "--format", "torchscript", "--out", path, "--data",
                           workspace() / "faces")
            if made.code != 0:
                return False, "export: " + made.last
        else:
            try:
                import onnx
                from onnx import TensorProto, helper
            except ImportError:
                return True, 'skipped: needs onnx (pip install "siamkit[export]")'
            path = workspace() / "model.onnx"
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            onnx.save(helper.make_model(graph), path)
        r = siamkit("evaluate", path, "--data", workspace() / "faces", "--device", "cpu")
        return r.one_error(f"is a{'n' if kind == 'ONNX' else ''} {kind} model (what siamkit export writes), "
                           f"not a checkpoint: pass the run it was exported from")
    return case


def retrained_gallery_explained() -> tuple[bool, str]:
    model, gallery = workspace() / "retrained", workspace() / "retrained-gallery"
    shutil.copytree(trained_run(), model)
    siamkit("enroll", model, "--data", workspace() / "faces", "--out", gallery, "--no-progress")
    other = workspace() / "other"
    siamkit("train", "--data", workspace() / "faces", "--out", other, "--steps", "2", "--seed", "1", "--no-progress",
            *TINY)
    shutil.copy(other / "checkpoints" / "last.pt", model / "checkpoints" / "last.pt")  # retrained in place
    r = siamkit("identify", gallery, workspace() / "faces" / "s1" / "1.pgm", "--threshold", "0.5")
    return r.one_error("has changed since this gallery was enrolled with it")


def no_checkpoint_advice_leads_somewhere() -> tuple[bool, str]:
    out = workspace() / "stopped"  # a run siamkit started (its marker) that stopped before its first checkpoint
    out.mkdir()
    (out / ".siamkit-run").write_text("")
    plain = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "1")
    resumed = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "1", "--resume")
    ok1, d1 = plain.one_error("it holds no checkpoint to resume (checkpoints/last.pt); pass --force")
    ok2, d2 = resumed.one_error("so there is nothing to resume; pass --force")
    advised = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "1", "--force")
    ok3 = advised.code == 0 and (out / "checkpoints" / "last.pt").is_file()
    return ok1 and ok2 and ok3, f"{d1} | {d2} | following the advice: exit {advised.code}"


def calibrate_leaves_no_report() -> tuple[bool, str]:
    run = workspace() / "calibrated"
    shutil.copytree(trained_run(), run)
    (run / "calibration.json").write_text("{ damaged")
    report = workspace() / "calibrate-eval"
    r = siamkit("evaluate", run, "--data", workspace() / "faces", "--out", report, "--calibrate", "--device", "cpu")
    ok, detail = r.one_error("is not a readable calibration")
    return ok and not report.exists(), detail + ("; a report was left" if report.exists() else "")


def no_progress_hides_every_bar() -> tuple[bool, str]:
    out = workspace() / "quiet"
    r = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "1", "--no-progress",
                "--cpu-tuning", "auto", "--cache-dir", workspace() / "quiet-cache")
    bars = [bar for bar in (b"decode:", b"measuring convolution kernels", b"train:") if bar in r.err]
    return r.code == 0 and not bars, f"exit {r.code}; bars shown: {bars or 'none'}"


def log_file_has_plain_lines() -> tuple[bool, str]:
    out = workspace() / "logged"
    r = siamkit("train", "--data", workspace() / "faces", "--out", out, *TINY, "--steps", "20", "--log-every", "1")
    size, returns = len(r.out) + len(r.err), r.err.count(b"\r") + r.out.count(b"\r")
    return r.code == 0 and returns == 0 and size <= 8192, f"{size} bytes, {returns} carriage returns (20 steps)"


CASES: list[tuple[str, Case]] = [
    ("5 a photo stored sideways with its EXIF tag scores 1.0 against the upright one", sideways_photo_scores_as_upright),
    ("5 align finds the face in the sideways photo: the upright one's crop", sideways_photo_aligns_as_upright),
    ("6 train --image-size 100000 100000: one line, no run, no cache", huge_image_size_refused),
    ("6 align --size 100000: one line, DST not created", huge_align_size_refused),
    ("7 verify --threshold nan: one line", threshold_case("nan", "--threshold nan is not a finite number")),
    ("7 verify --threshold 5 (cosine): one line", threshold_case("5", "outside the cosine score's range [-1, 1]")),
    ("7 identify --threshold 0.5 --far 1e-1: refused as verify refuses it", identify_threshold_beside_far_refused),
    ("7 train --steps 5 --epochs 2: one line, no run", steps_beside_epochs_refused),
    ("7 verify on a 1x1 image: one line", tiny_image_refused_by_verify),
    ("8 folders named b'\\xff\\xfe', b'caf\\xe9': train/evaluate/enroll/identify, no traceback", non_utf8_names_work),
    ("9 a pairs CSV saved by Excel (UTF-8 BOM) keeps its header", excel_csv_keeps_its_header),
    ("9 evaluate model.pt (TorchScript): named as such, run asked for", exported_model_named("TorchScript")),
    ("9 evaluate model.onnx: named as such, run asked for", exported_model_named("ONNX")),
    ("9 identify after the model was retrained in place: 'has changed'", retrained_gallery_explained),
    ("9 a run folder without a checkpoint: --force advised (and works), not --resume", no_checkpoint_advice_leads_somewhere),
    ("9 evaluate --calibrate that cannot calibrate leaves no report", calibrate_leaves_no_report),
    ("9 train --no-progress: no decode, kernel or train bar", no_progress_hides_every_bar),
    ("9 train with stderr to a file: plain lines, no \\r, <= 8 kB", log_file_has_plain_lines),
]


def run_cases(cases: list[tuple[str, Case]]) -> int:
    """Run each case, print a table, return how many failed (a case that raises fails, with its exception)."""
    failed = 0
    width = max(len(name) for name, _ in cases)
    print(f"{'case':<{width}}  result")
    for name, case in cases:
        try:
            ok, detail = case()
        except Exception as e:
            ok, detail = False, f"raised {type(e).__name__}: {e}"
        failed += not ok
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'} {detail}", flush=True)
    print(f"{len(cases) - failed} of {len(cases)} cases meet their promise")
    return failed


if __name__ == "__main__":
    sys.exit(1 if run_cases(CASES) else 0)
