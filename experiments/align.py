"""Face alignment measured: detection rate and time per image, and landmark accuracy on synthetic photos.

    # `siamkit align` (the product's align_folder, worker processes on every core) on whole data sets:
    python experiments/align.py detect /work/shared/data/rof_neutral /work/shared/data/att_faces --keep /tmp/aligned
    # real faces pasted into photos with a known transform (rotation, scale, position, textured background):
    python experiments/align.py synthetic --faces 400 --seed 0

`detect` reports, per data set, the share of images in which a face was detected (an image aligned with the
whole frame as the face, --undetected frame, is counted apart and never as found), how each face was found,
and wall and CPU seconds per image (CPU: this process and its workers together). `--keep DIR` keeps the
aligned folders (DIR/<name>) for training on them.

`synthetic` takes faces of rof_neutral and AT&T whose untouched image has a detection (their landmarks are the
reference), pastes each into a textured background of 400-640 px a side, rotated by a uniform angle in
[-30, 30] degrees and scaled by a log-uniform factor in [0.5, 2], at a random position, and detects it again.
A face counts as found when the detection picked (the largest) is the pasted face (its box centre inside the
pasted face's box). The landmark error is measured in the 112x112 aligned crop: the reference landmarks carried
through the known paste transform, and then through the similarity that aligns them to the template, against the
found landmarks through the same similarity: the mean distance over the 5 points, in crop pixels.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/machine.py
from machine import describe_device  # noqa: E402
from siamkit.faces.align import apply, estimate_similarity, template  # noqa: E402
from siamkit.faces.detect import detect_faces  # noqa: E402
from siamkit.faces.folder import REPORT, AlignOptions, align_folder  # noqa: E402


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def detect(args) -> None:
    print(f"machine: {describe_device('cpu')}")
    print("| data | images | face detected | aligned without detection (--undetected frame) | no face | unreadable "
          "| found by (hog / hog-rotated / cnn) | wall ms/image | CPU ms/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        name = Path(folder).name
        keep = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix="siamkit-align-bench-")) / name
        wall, cpu = time.perf_counter(), cpu_seconds()
        align_folder(folder, keep, AlignOptions(undetected="frame"), workers=args.workers, progress=False)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        report = json.loads((keep / REPORT).read_text())
        c, n = report["counts"], report["counts"]["images"]
        by = report["found_by"]
        print(f"| {name} | {n:,} | **{c['aligned'] / n:.2%}** ({c['aligned']:,}) | {c['aligned_without_detection']:,} "
              f"| {c['no_face']:,} | {c['unreadable']:,} | {by.get('hog', 0):,} / {by.get('hog-rotated', 0):,} / "
              f"{by.get('cnn', 0):,} | {1000 * wall / n:.1f} | {1000 * cpu / n:.1f} |", flush=True)


def texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Textured background: random colour noise at three scales (coarse blobs to fine grain)."""
    out = np.zeros((h, w, 3))
    for cell, weight in ((64, 0.5), (16, 0.3), (4, 0.2)):
        small = rng.uniform(0, 255, (h // cell + 2, w // cell + 2, 3)).astype(np.uint8)
        out += weight * np.asarray(Image.fromarray(small).resize((w + 2 * cell, h + 2 * cell), Image.Resampling.BICUBIC))[:h, :w]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def paste(face: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, tuple]:
    """The face pasted into a textured photo; returns (photo, 2x3 face->photo matrix, pasted box in the photo)."""
    angle = rng.uniform(-30, 30)
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w, h = face.size
    side = int(rng.integers(400, 641))
    photo = texture(rng, side, side)
    # face pixel p -> photo: rotate by angle about the face centre, scale, then translate to a random spot.
    rad = np.deg2rad(angle)
    a = scale * np.array([[np.cos(rad), np.sin(rad)], [-np.sin(rad), np.cos(rad)]])
    corners = (np.array([[0, 0], [w, 0], [0, h], [w, h]]) - [w / 2, h / 2]) @ a.T
    half = np.abs(corners).max(axis=0)
    cx = rng.uniform(half[0], side - half[0]) if side > 2 * half[0] else side / 2
    cy = rng.uniform(half[1], side - half[1]) if side > 2 * half[1] else side / 2
    m = np.hstack([a, (np.array([cx, cy]) - a @ [w / 2, h / 2])[:, None]])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    coeffs = tuple(inv.ravel())
    warped = face.convert("RGB").transform((side, side), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    mask = Image.new("L", face.size, 255).transform((side, side), Image.Transform.AFFINE, coeffs,
                                                    resample=Image.Resampling.BILINEAR)
    photo.paste(warped, (0, 0), mask)
    box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
    return photo, m, box


def synthetic_one(job: tuple[str, int]) -> dict | None:
    path, seed = job
    face = Image.open(path).convert("RGB")
    ref = detect_faces(face)
    if not ref:
        return None  # no reference landmarks: not a usable sample
    ref_lm = max(ref, key=lambda f: f.area).landmarks
    rng = np.random.default_rng(seed)
    photo, m, box = paste(face, rng)
    t0 = time.process_time()
    found = detect_faces(photo)
    cpu = time.process_time() - t0
    truth = apply(m, ref_lm)
    row = {"path": path, "cpu": cpu, "found": False, "error": None, "by": None}
    if found:
        f = max(found, key=lambda f: f.area)
        cx, cy = f.center
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            s = estimate_similarity(truth, template(112))
            err = np.linalg.norm(apply(s, f.landmarks) - apply(s, truth), axis=1).mean()
            row.update(found=True, error=float(err), by=f.found_by)
    return row


def synthetic(args) -> None:
    rng = random.Random(args.seed)
    data = Path(args.data)
    rof = sorted(str(p) for p in (data / "rof_neutral").rglob("*.jpg"))
    att = sorted(str(p) for p in (data / "att_faces").rglob("*.pgm"))
    n_att = args.faces // 4
    paths = rng.sample(rof, args.faces - n_att) + rng.sample(att, n_att)
    jobs = [(p, args.seed * 100_000 + i) for i, p in enumerate(paths)]
    wall, cpu = time.perf_counter(), cpu_seconds()
    with Pool(args.workers) as pool:
        rows = [r for r in pool.imap(synthetic_one, jobs, chunksize=4) if r is not None]
    wall = time.perf_counter() - wall
    print(f"machine: {describe_device('cpu')}")
    print(f"{len(paths)} faces drawn (seed {args.seed}: {args.faces - n_att} rof_neutral, {n_att} AT&T), {len(rows)} with a "
          f"reference detection in the untouched image; {wall:.0f} s wall")
    print("| faces | set | found | mean landmark error (px at 112x112) | median | 95th pct | found by (hog / hog-rotated / cnn) | detect CPU ms/photo |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sel in (("all", rows), ("rof_neutral", [r for r in rows if "rof_neutral" in r["path"]]),
                      ("AT&T", [r for r in rows if "att_faces" in r["path"]])):
        found = [r for r in sel if r["found"]]
        errs = np.array([r["error"] for r in found])
        by = Counter(r["by"] for r in found)
        print(f"| {len(sel)} | {name} | **{len(found) / len(sel):.1%}** | **{errs.mean():.2f}** | {np.median(errs):.2f} "
              f"| {np.percentile(errs, 95):.2f} | {by['hog']} / {by['hog-rotated']} / {by['cnn']} "
              f"| {1000 * np.mean([r['cpu'] for r in sel]):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="task", required=True)
    d = sub.add_parser("detect")
    d.add_argument("folders", nargs="+")
    d.add_argument("--keep", default=None)
    d.add_argument("--workers", type=int, default=None)
    s = sub.add_parser("synthetic")
    s.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    s.add_argument("--faces", type=int, default=400)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--json", default=None, help="write every photo's row here")
    args = ap.parse_args()
    {"detect": detect, "synthetic": synthetic}[args.task](args)


if __name__ == "__main__":
    main()
