"""Verification of pasted, rotated and scaled faces with `--align`, against the aligned originals.

Takes a run trained on an aligned rof_neutral folder (`siamkit align ... --undetected frame`, then `siamkit
train --data ALIGNED`), the identities it held out (those of the folder that are not in its checkpoint), and
their original photos whose face `siamkit align` detected. Each original is pasted into a textured photo
(experiments/align.py's `paste`: rotated by up to +-30 degrees, scaled 0.5-2x, at a random position, 400-640 px
a side). Then, on the same images and the same pairs (every genuine pair, as many seeded impostor pairs):
- the aligned originals (the run's own held-out data);
- the pasted photos with --align (detect, landmarks, warp, then the model's preprocessing, which for a run
  trained on aligned tight crops fills beyond their photo box: what `siamkit evaluate --align` runs), and for
  such a run the same without that fill;
- the pasted photos as they are (no alignment), and the raw originals (tight crops, no alignment).
An image is kept only where the pasted photo's face was detected, so that every row scores the same pairs.

    python experiments/align_verify.py RUN /tmp/aligned/rof_neutral --photos /work/shared/data/rof_neutral
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/machine.py
from align import paste  # noqa: E402
from machine import describe_device  # noqa: E402
from siamkit.api import load_model, run_flip  # noqa: E402
from siamkit.data.sources import load_source  # noqa: E402
from siamkit.data.transforms import Preprocess  # noqa: E402
from siamkit.eval.protocol import evaluate  # noqa: E402
from siamkit.faces.folder import REPORT, align_folder  # noqa: E402
from siamkit.faces.use import options_for  # noqa: E402


def edge_filled(face: Image.Image, m: np.ndarray, side: int) -> Image.Image:
    """The face placed by the paste's matrix ``m`` (face -> photo) on a side x side photo whose every pixel
    outside the face repeats the face's nearest edge pixel, in the face's own frame (as warping the tight crop
    with edge replication does), instead of the textured background."""
    w, h = face.size
    a = m[:, :2]
    pad = int(np.ceil(2 * side / min(np.linalg.svd(a, compute_uv=False)))) + max(w, h)  # covers the whole photo
    padded = Image.fromarray(np.pad(np.asarray(face), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    shifted = np.hstack([a, (m[:, 2] - a @ [pad, pad])[:, None]])  # padded-face pixel -> photo
    inv = np.linalg.inv(np.vstack([shifted, [0, 0, 1]]))[:2]
    return padded.transform((side, side), Image.Transform.AFFINE, tuple(inv.ravel()), resample=Image.Resampling.BILINEAR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("aligned", type=Path, help="the aligned folder the run was trained on")
    ap.add_argument("--photos", type=Path, required=True, help="the original photos that folder was aligned from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edge-background", action="store_true",
                    help="also: the same pastes with the photo around the face filled by the face's edge pixels "
                         "(what aligning the tight crop itself shows there) instead of texture, aligned the same way")
    ap.add_argument("--work", type=Path, default=None,
                    help="working folder: its pasted photos and their alignment are reused when present "
                         "(default: a new temporary folder)")
    args = ap.parse_args()
    model, ckpt = load_model(args.run, "cpu")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    flip = run_flip(ckpt)
    trained = set(ckpt["identities"])
    report = json.loads((args.aligned / REPORT).read_text())
    undetected = {d["path"] for d in report["aligned_without_detection"] + report["no_face"] + report["unreadable"]}
    rels = sorted(str(p.relative_to(args.aligned)) for p in args.aligned.rglob("*.*")
                  if p.parent != args.aligned and p.parts[-2] not in trained)
    rels = [r for r in rels if r not in undetected]
    work = args.work or Path(tempfile.mkdtemp(prefix="align_verify_"))
    pasted = work / "pasted"
    png = lambda rel: str(Path(rel).with_suffix(".png"))  # noqa: E731
    scales = {}  # the paste's scale of each image (its rng draws: angle, then scale)
    for i, rel in enumerate(rels):
        rng = np.random.default_rng(args.seed * 100_000 + i)
        if not (pasted / png(rel)).is_file():
            photo, _, _ = paste(Image.open(args.photos / rel).convert("RGB"), rng)
            (pasted / rel).parent.mkdir(parents=True, exist_ok=True)
            photo.save(pasted / png(rel))
            rng = np.random.default_rng(args.seed * 100_000 + i)
        rng.uniform(-30, 30)
        scales[rel] = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        if args.edge_background and not (work / "edge" / png(rel)).is_file():
            face = Image.open(args.photos / rel).convert("RGB")
            photo, m, _ = paste(face, np.random.default_rng(args.seed * 100_000 + i))
            (work / "edge" / rel).parent.mkdir(parents=True, exist_ok=True)
            edge_filled(face, m, photo.size[0]).save(work / "edge" / png(rel))
    align_folder(pasted, work / "pasted_aligned", options_for(ckpt.get("alignment")), progress=False)  # resumes
    if args.edge_background:
        align_folder(work / "edge", work / "edge_aligned", options_for(ckpt.get("alignment")), progress=False)
    found = [r for r in rels if (work / "pasted_aligned" / png(r)).is_file()
             and (not args.edge_background or (work / "edge_aligned" / png(r)).is_file())]
    print(f"machine: {describe_device('cpu')}; run {args.run}: {len(set(Path(r).parts[0] for r in rels))} held-out "
          f"identities, {len(rels)} images with a detected face; pasted photos with a face found again: "
          f"{len(found)} ({len(found) / len(rels):.1%}); rows below score the same pairs of these {len(found)} images")
    sets = {
        "aligned originals (siamkit align on the tight crops)": (args.aligned, None),
        "pasted photos, `--align`": (work / "pasted_aligned", png),
        **({"pasted photos, `--align`, without the fill beyond the photo box": (work / "pasted_aligned", png)}
           if pre.fill_box else {}),
        **({"same pastes, edge-filled around the face instead of texture, `--align`": (work / "edge_aligned", png)}
           if args.edge_background else {}),
        "pasted photos, unaligned": (pasted, png),
        "original tight crops, unaligned": (args.photos, None),
    }
    # The same comparison on the images pasted at least as large as they were (scale >= 1): the paste's
    # downscaling (0.5-1x) throws away pixels of small sources that no alignment can bring back.
    large = [r for r in found if scales[r] >= 1.0]
    subsets = {"": found, f" (the {len(large)} pasted at scale >= 1)": large}
    print("| images | 10-fold accuracy % | ROC AUC | EER % | pairs |")
    print("|---|---|---|---|---|")
    for label, subset in subsets.items():
        for name, (root, rename) in sets.items():
            view = work / ("view_" + str(abs(hash(name + label))))
            shutil.rmtree(view, ignore_errors=True)
            # Same names in every view (the originals' .jpg names), so that the seeded impostor pairs are the same.
            for rel in subset:
                t = view / rel
                t.parent.mkdir(parents=True, exist_ok=True)
                t.symlink_to((root / (rename(rel) if rename else rel)).resolve())
            # the model's own preprocessing, except in the row that shows what the fill does
            used = replace(pre, fill_box=None) if "without the fill" in name else pre
            ds = load_source(str(view), used)
            r = evaluate(model, used, ds, score=ckpt.get("score", "cosine"), flip=flip, seed=args.seed).report
            print(f"| {name}{label} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | "
                  f"{r['roc_auc']:.4f} | {100 * r['eer']:.2f} | {r['n_pairs']:,} |", flush=True)


if __name__ == "__main__":
    main()
