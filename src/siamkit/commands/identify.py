"""`siamkit identify`: who, of an enrolled gallery, is in each image (Verifier.identify)."""
from __future__ import annotations

import argparse

from ..errors import SiamkitError
from .common import refuse_threshold_beside_far


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..calibration import pick_threshold
    from ..gallery import load_gallery

    if args.top_k < 1:
        raise SiamkitError(f"--top-k must be at least 1, got {args.top_k}")
    refuse_threshold_beside_far(args)
    gallery = load_gallery(args.gallery)
    model = args.model or gallery.meta["model"]
    verifier = load(model)
    threshold, what = pick_threshold(verifier.calibration, args.threshold, args.far, verifier.score_name)
    found = verifier.identify(args.images, gallery, args.top_k, threshold=threshold, backend=args.backend,
                              model_name=model)
    for image, match in zip(args.images, found):
        best, best_score = match["top_k"][0]
        verdict = match["identity"] or f"unknown (best {best} {best_score:.4f} < threshold)"
        top = ", ".join(f"{name} {s:.4f}" for name, s in match["top_k"])
        print(f"{image}: {verdict}\n  top-{len(match['top_k'])}: {top}")
    print(f"threshold {threshold:.6g}: {what}")
    return 0
