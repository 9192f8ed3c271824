"""Test-time views: which fixed views of each image, averaged into its embedding, verify unseen people best?

For trained runs (e.g. the run folders experiments/recipe.py leaves in its work folder), embeds the run's own
held-out identities (its --val-identities and seed), or --data, under several sets of views and prints the
10-fold accuracy and ROC AUC of each, per run and as the mean over the runs. Every set includes each view's
mirror image. The candidates:
- `flip`: the image alone (and its mirror): --eval-flip;
- `4 shifts`: plus four copies shifted by 1/16 of the side, edges repeated: --eval-shifts (checked here against
  siamkit's own embed_images);
- `4 shifts + 2 zooms`: plus a zoom in (the centre, cropped by the shift on every side, resized up) and a zoom
  out (padded by the shift, resized down);
- `8 shifts`: the 3x3 grid of shifts; `8 shifts + 2 zooms`.

    python experiments/eval_views.py /tmp/recipe_*/rof-0-0 /tmp/recipe_*/rof-0-1 /tmp/recipe_*/rof-0-2
    python experiments/eval_views.py RUN ... --data att-test     # another data set than the runs' held-out people
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from siamkit.api import load_model  # noqa: E402
from siamkit.data.sources import load_source, split_identities  # noqa: E402
from siamkit.data.transforms import Preprocess, normalize, shift_pixels  # noqa: E402
from siamkit.eval.embed import embed_images  # noqa: E402
from siamkit.eval.protocol import MAX_GENUINE_PAIRS, pairs_for  # noqa: E402
from siamkit.eval.verification import verification_report  # noqa: E402

CANDIDATES = ("flip", "4 shifts", "4 shifts + 2 zooms", "8 shifts", "8 shifts + 2 zooms")


def views_of(x: torch.Tensor, shift: int) -> dict[str, torch.Tensor]:
    """The named views of a normalised batch (each to be embedded with its mirror)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")

    def shifted(dx: int, dy: int) -> torch.Tensor:
        return padded[..., shift + dy : shift + dy + h, shift + dx : shift + dx + w]

    s = shift
    views = {"image": x}
    views.update({f"shift {dx},{dy}": shifted(dx, dy) for dx in (-s, 0, s) for dy in (-s, 0, s) if (dx, dy) != (0, 0)})
    views["zoom in"] = F.interpolate(x[..., s : h - s, s : w - s], size=(h, w), mode="bilinear", align_corners=False)
    views["zoom out"] = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return views


def members(candidate: str, s: int) -> list[str]:
    four = [f"shift {s},0", f"shift {-s},0", f"shift 0,{s}", f"shift 0,{-s}"]
    diagonals = [f"shift {dx},{dy}" for dx in (-s, s) for dy in (-s, s)]
    zooms = ["zoom in", "zoom out"]
    return ["image"] + {"flip": [], "4 shifts": four, "4 shifts + 2 zooms": four + zooms, "8 shifts": four + diagonals,
                        "8 shifts + 2 zooms": four + diagonals + zooms}[candidate]


@torch.inference_mode()
def evaluate_views(run: str, data: str | None) -> dict[str, tuple[float, float]]:
    cfg = json.loads((Path(run) / "config.json").read_text())
    model, ckpt = load_model(run, "cpu")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    if data is None:
        _, ds = split_identities(load_source(cfg["data"], pre), cfg["val_identities"], cfg["seed"])
    else:
        ds = load_source(data, pre)
    pairs = pairs_for(ds, None, cfg["seed"], MAX_GENUINE_PAIRS)
    s = shift_pixels(pre.image_size)
    sums = {}  # per view: the embeddings of the view and its mirror, summed, in batches of 256
    for start in range(0, len(ds), 256):
        x = normalize(ds.images[start : start + 256], pre, channels_last=True)
        for name, v in views_of(x, s).items():
            e = model.embed(v).float() + model.embed(v.flip(-1)).float()
            sums.setdefault(name, []).append(e.double())
    sums = {name: torch.cat(parts) for name, parts in sums.items()}
    # The product's --eval-flip --eval-shifts must be what "4 shifts" computes here (float32 sums in another
    # order: a few float32 roundings of unit vectors apart).
    product = embed_images(model, ds.images, pre, flip=True, shifts=True)
    mine = F.normalize(sum(sums[m] for m in members("4 shifts", s)), dim=1).numpy()
    assert np.abs(product - mine).max() < 1e-4, "eval_views.py's 4 shifts differ from siamkit's --eval-shifts"
    out = {}
    for candidate in CANDIDATES:
        e = F.normalize(sum(sums[m] for m in members(candidate, s)), dim=1)
        scores = (e[pairs.idx_a] * e[pairs.idx_b]).sum(1).numpy()
        report = verification_report(scores, pairs.same, pairs.fold, "cosine")
        out[candidate] = (report["accuracy_mean"], report["roc_auc"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--data", default=None, help="evaluate here instead of each run's held-out identities")
    args = p.parse_args()
    results = []
    for run in args.runs:
        results.append(evaluate_views(run, args.data))
        print(f"<!-- {run}: " + ", ".join(f"{c} {100 * a:.2f}" for c, (a, _) in results[-1].items()) + " -->",
              flush=True)
    where = args.data or "each run's held-out identities"
    print(f"\n{len(args.runs)} runs, {where}: 10-fold accuracy % per run, mean, and minus `flip` on the same runs\n")
    print("| views (each with its mirror) | " + " | ".join(f"run {i + 1} %" for i in range(len(args.runs))) +
          " | mean % | minus `flip` (points) | mean AUC |")
    print("|---|" + "---:|" * (len(args.runs) + 3))
    base = statistics.mean(r["flip"][0] for r in results)
    for c in CANDIDATES:
        accs = [r[c][0] for r in results]
        print(f"| {c} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + f" | {100 * statistics.mean(accs):.2f} | "
              f"{100 * (statistics.mean(accs) - base):+.2f} | {statistics.mean(r[c][1] for r in results):.4f} |")


if __name__ == "__main__":
    main()
