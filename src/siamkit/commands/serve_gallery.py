"""siamkit serve-gallery import|export: a gallery.npz into a server's gallery, or back (serve/npz.py)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..serve.npz import serve_gallery

    return serve_gallery(args)
