"""`siamkit verify`: do two images (or each pair of a CSV file) show the same identity?"""
from __future__ import annotations

import argparse

from ..errors import SiamkitError
from .common import refuse_threshold_beside_far


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..calibration import pick_threshold

    refuse_threshold_beside_far(args)
    if (args.pairs is None) == (args.image2 is None):
        raise SiamkitError("give two images, or --pairs PAIRS.csv --out DECISIONS.csv (not both)")
    if args.pairs is not None and (args.out is None or args.image1 is not None):
        raise SiamkitError("--pairs takes no image arguments and needs --out DECISIONS.csv")
    if args.pairs is not None:
        from ..outputs import check_output_file, existing_inputs, run_inputs

        check_output_file(args.out, [*run_inputs(args.run), *existing_inputs([args.pairs])], args.force)
    verifier = load(args.run, align=args.align)
    threshold, what = pick_threshold(verifier.calibration, args.threshold, args.far, verifier.score_name)
    if args.pairs is not None:
        from ..eval.decisions import verify_pairs_csv

        verify_pairs_csv(verifier, args.pairs, args.out, threshold, what)
        return 0
    s = verifier.score(args.image1, args.image2)
    print(f"score {s:.4f}  threshold {threshold:.4f}  {'SAME' if s >= threshold else 'DIFFERENT'}")
    print(f"threshold: {what}")
    return 0
