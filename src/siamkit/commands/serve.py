"""siamkit serve MODEL: the HTTP service (serve/command.py)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..serve.command import serve

    return serve(args)
