"""`siamkit align`: detect, landmark and align the faces of a folder of photos."""
from __future__ import annotations

import argparse

def run(args: argparse.Namespace) -> int:
    from ..faces.folder import AlignOptions, align_folder

    opts = AlignOptions.for_template(args.template, args.size, args.margin, pick=args.pick, undetected=args.undetected)
    align_folder(args.src, args.dst, opts, workers=args.workers, progress=not args.no_progress, force=args.force)
    return 0
