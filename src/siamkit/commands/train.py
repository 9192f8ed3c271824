"""`siamkit train`: train a Siamese network from the command line's TrainConfig, then evaluate it."""
from __future__ import annotations

import argparse

def run(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..train.loop import train

    cfg = TrainConfig.from_dict(vars(args))  # the parser's other options (--resume, ...) are not config
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
          inputs=[args.config] if args.config else [])
    return 0
