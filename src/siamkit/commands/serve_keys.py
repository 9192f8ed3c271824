"""siamkit serve-keys create: a new API key for siamkit serve (serve/keys.py)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..serve.command import serve_keys

    return serve_keys(args)
