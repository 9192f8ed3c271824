"""The built-in `dlib` model as it is, against dlib's own pipeline on the same pairs; and what the second baseline
costs the main job.

1. `siamkit evaluate dlib --data DATA` (the product's command: siamkit's detection views, 5 landmarks,
   dlib.get_face_chip 150 px, the PyTorch network) beside dlib's own pipeline on the same images and pairs:
   dlib-bin's HOG detector on the original image, as it is and with a black border of 25% of its longer side
   (upsampled once, then twice; the whole frame as the face where it finds none), its 5-point shape predictor,
   get_face_chip(size=150, padding=0.25) and compute_face_descriptor
   (num_jitters=0), scored as minus the Euclidean distance. 10-fold accuracy, each fold's threshold chosen on the
   other nine; the pairs are those of the command's report (all genuine pairs + as many impostor pairs, seed 0).
   Data: the built-in att-test (AT&T s31-s40), and ROF-neutral's held-out people of the faces recipe's seed-0
   split (`siamkit train --data rof_neutral --val-identities 0.2 --seed 0` holds out these 36 people).
2. The second baseline's cost in the main job (`siamkit train`, no arguments): dlib_baseline on its held-out
   people (att, seed 0: 8 people, 80 images), timed in this process (wall and CPU), cold (models not loaded).

    python benchmarks/dlib_offshelf.py [--rof /path/to/rof_neutral] [--skip-rof]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from machine import data_root, describe_device  # noqa: E402
from siamkit.api import load_model  # noqa: E402
from siamkit.cli import main as siamkit_main  # noqa: E402
from siamkit.data.cache import load_data  # noqa: E402
from siamkit.data.pixels import Preprocess  # noqa: E402
from siamkit.data.sources import (default_preprocess, list_folder, load_source, native_preprocess,  # noqa: E402
                                  split_identities)
from siamkit.eval.protocol import pairs_for  # noqa: E402
from siamkit.eval.verification import pair_scores, verification_report  # noqa: E402
from siamkit.faces.chip_data import chip_folder  # noqa: E402
from siamkit.faces.detect import model_file  # noqa: E402
from siamkit.faces.folder import open_photo  # noqa: E402

# dlib's own pipeline on the photo as it is, and with a black border of a quarter of its longer side (tight crops
# such as AT&T's leave HOG's 80 px window little room: 5 of att-test's 100 photos have no detection as they are)
PADS = (0.0, 0.25)


def product_report(data: str, out: Path) -> dict:
    """`siamkit evaluate dlib --data DATA --out OUT`, as a user runs it; its report.json."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert siamkit_main(["evaluate", "dlib", "--data", data, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def evaluated_pairs(data: str):
    """The dataset and pairs the command evaluated (the same chips, decoding and pair draw)."""
    _, ckpt = load_model("dlib")
    ds = load_data(chip_folder(data, progress=False), Preprocess.from_dict(ckpt["preprocess"]))
    return ds, pairs_for(ds, None, seed=0)


def original_photos(data: str, paths: list[str]):
    """The original images (RGB arrays) the chips were cut from."""
    pre = native_preprocess(data)
    if pre is not None:  # a built-in set: its images at their own size
        native = load_source(data, pre)
        row = {p: i for i, p in enumerate(native.paths)}
        return [np.repeat(native.images[row[p]].numpy().transpose(1, 2, 0), 3 // pre.channels, axis=2) for p in paths]
    return [np.asarray(open_photo(Path(data) / p).convert("RGB")) for p in paths]


def dlib_own_descriptors(photos, pad: float) -> tuple[np.ndarray, int]:
    """dlib's own pipeline on each photo, given a black border of ``pad`` x its longer side (HOG's window needs room
    around the face of a tight crop); -> (descriptors [N, 128], photos where HOG found no face)."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(model_file("shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(model_file("dlib_face_recognition_resnet_model_v1.dat"))
    out, missed = [], 0
    for img in photos:
        border = int(round(pad * max(img.shape[:2])))
        img = np.ascontiguousarray(np.pad(img, ((border, border), (border, border), (0, 0))))
        rects = detector(img, 1) or detector(img, 2)
        if rects:
            rect = max(rects, key=lambda r: r.area())
        else:
            missed += 1
            rect = dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
        chip = dlib.get_face_chip(img, shapes(img, rect), size=150, padding=0.25)
        out.append(np.array(net.compute_face_descriptor(chip, num_jitters=0)))
    return np.stack(out), missed


def compare(name: str, data: str, work: Path) -> str:
    report = product_report(data, work / name)
    ds, pairs = evaluated_pairs(data)
    assert len(pairs.same) == report["n_pairs"]
    photos = original_photos(data, ds.paths)
    own = {}
    for pad in PADS:
        desc, missed = dlib_own_descriptors(photos, pad)
        own[pad] = verification_report(pair_scores(desc[pairs.idx_a], desc[pairs.idx_b], "euclidean"), pairs.same,
                                       pairs.fold, "euclidean"), missed
    chips = json.loads((Path(chip_folder(data, progress=False)) / "align_report.json").read_text())["counts"]
    cells = " | ".join(f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} ({m} without a HOG "
                       f"detection), gap {100 * (report['accuracy_mean'] - r['accuracy_mean']):+.2f}"
                       for r, m in own.values())
    return (f"| {name} | {report['n_pairs']} ({report['n_genuine']} genuine) | {len(ds)} of {chips['images']} "
            f"({chips['no_face']} without a face skipped) | {100 * report['accuracy_mean']:.2f} ± "
            f"{100 * report['accuracy_std']:.2f} | {cells} | {100 * report['baseline']['accuracy_mean']:.1f} |")


def rof_held_out(rof: Path, work: Path) -> str:
    """A folder of symlinks to the people the faces recipe holds out of ROF-neutral at seed 0."""
    names, _ = list_folder(rof)
    # split_identities draws by identity index only: labels in name order, as load_folder numbers them
    from siamkit.data.sources import IdentityDataset
    import torch

    stand_in = IdentityDataset(torch.zeros(len(names), 1, 1, 1, dtype=torch.uint8), np.arange(len(names)), names,
                               names, str(rof))
    _, held = split_identities(stand_in, 0.2, 0)
    folder = work / "rof-held-out"
    folder.mkdir()
    for person in held.names:
        (folder / person).symlink_to(rof / person)
    return str(folder)


def baseline_cost() -> str:
    """The second baseline of the main job's held-out report, timed alone, cold."""
    from siamkit.config import RECIPES, TrainConfig
    from siamkit.eval.dlib_baseline import dlib_baseline

    cfg = TrainConfig(**RECIPES["faces"])
    pre = default_preprocess(cfg.data, cfg.image_size, cfg.center_crop, cfg.grayscale)
    _, val = split_identities(load_source(cfg.data, pre), cfg.val_identities, cfg.seed)
    pairs = pairs_for(val, None, cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    result = dlib_baseline(val, pairs.idx_a, pairs.idx_b, pairs.same, pairs.fold)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (f"| main job's held-out people ({val.n_identities} people, {len(val)} images, {len(pairs.same)} pairs) | "
            f"{wall:.1f} | {cpu:.1f} | {100 * result['accuracy_mean']:.1f} |")


def main() -> None:
    default_data = data_root()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rof", type=Path, default=default_data / "rof_neutral")
    p.add_argument("--skip-rof", action="store_true")
    args = p.parse_args()
    print(f"# dlib's face model off the shelf: siamkit evaluate dlib vs dlib's own pipeline\n\n"
          f"{describe_device('cpu')}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| data | pairs | images evaluated | `siamkit evaluate dlib` accuracy % | "
          + " | ".join(f"dlib's own pipeline % (photo padded by {100 * pad:g}% of its side; gap in points)" for pad in PADS)
          + " | raw pixels % |\n|---|---|---|---:|" + "---:|" * len(PADS) + "---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(compare("att-test", "att-test", work), flush=True)
        if not args.skip_rof:
            print(compare("ROF-neutral held-out (seed 0)", rof_held_out(args.rof, work), work), flush=True)
    print("\n| the second baseline (`baseline_dlib`), cold | wall s | CPU s | dlib accuracy % |\n|---|---:|---:|---:|")
    print(baseline_cost())


if __name__ == "__main__":
    main()
