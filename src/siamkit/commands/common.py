"""What several commands share: the views (--flip, --shifts), --data as a model sees it (aligned, dlib's chips),
--threshold beside --far."""
from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path


def refuse_threshold_beside_far(args: argparse.Namespace) -> None:
    """--threshold beside --far: refused before anything is loaded, in verify and identify alike."""
    if args.threshold is not None and args.far is not None:
        from ..calibration import THRESHOLD_OPTIONS_CONFLICT
        from ..options import one_of

        raise one_of("--threshold", "--far", THRESHOLD_OPTIONS_CONFLICT)


def source_for_model(data: str, alignment: dict | None, pre):
    """A folder or built-in source decoded for a model; for one that reads dlib's face chips, its chips (cut once
    into the cache, faces/chip_data.py)."""
    from ..data.sources import load_source
    from ..faces.chips import is_dlib_chip

    if is_dlib_chip(alignment):
        from ..faces.chip_data import chip_folder

        data = chip_folder(data)
    return load_source(data, pre)


@contextmanager
def model_data(args: argparse.Namespace, ckpt: dict):
    """(--data as the model should see it, whether that is a temporary folder): with --align, an aligned copy in a
    temporary folder (removed after); for a model that reads dlib's face chips, the chips cut into the cache
    (faces/chip_data.py)."""
    from ..faces.chips import is_dlib_chip
    from ..faces.use import align_data, check_chip_templates, is_aligned_folder, warn_mismatch

    alignment = ckpt.get("alignment")
    if is_dlib_chip(alignment):
        from ..faces.chip_data import chip_folder

        yield chip_folder(args.data, args.cache_dir), False
        return
    check_chip_templates(alignment, args.data)
    if not args.align:
        warn_mismatch(alignment, is_aligned_folder(args.data), f"the images of {args.data}")
        yield args.data, False
        return
    from ..faces.detect import check_installed

    check_installed()
    warn_mismatch(alignment, True, f"the images of {args.data} (--align)")
    with tempfile.TemporaryDirectory(prefix="siamkit-align-") as tmp:
        yield align_data(args.data, alignment, Path(tmp) / "aligned"), True


def load_model_data(args: argparse.Namespace, ckpt: dict, pre):
    """--data as the model sees it (model_data), decoded through the decoded cache; an aligned temporary copy
    (--align) is decoded into memory instead, since a cache of a folder removed right after would only take disk space."""
    from ..data.cache import load_data

    with model_data(args, ckpt) as (data, temporary):
        return load_data(data, pre, "none" if temporary else args.cache_dir)


def views(args: argparse.Namespace, ckpt: dict) -> tuple[bool, bool]:
    """(flip, shifts): the command line's --flip / --shifts, else the run's own."""
    from ..api import run_flip, run_shifts

    return (run_flip(ckpt) if args.flip is None else args.flip,
            run_shifts(ckpt) if args.shifts is None else args.shifts)
