"""Command line: siamkit train | evaluate | verify | embed | align. The train options are generated from TrainConfig."""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__
from .config import GROUPS, RECIPES, TrainConfig, sources_help
from .data.sources import source_of
from .errors import SiamkitError
from .options import add_arguments


class _Parser(argparse.ArgumentParser):
    """argparse, but bad options end in one 'siamkit: error:' line like every other error."""

    def error(self, message: str):
        command = self.prog.split()[-1]
        raise SiamkitError(f"{message} (see siamkit {command + ' ' if command != 'siamkit' else ''}--help)")


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a Siamese network, then evaluate it on held-out identities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_arguments(p, TrainConfig, groups)
    g = groups["run"]
    g.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="start from a run's config.json (options given here override it)")
    g.add_argument("--recipe", default="auto", choices=("auto", *RECIPES),
                   help="start from a set of options measured to work well (README: Accuracy on unseen faces); "
                        "auto = the data's: faces for face folders and the built-in faces, none for digits; "
                        "options given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _train(args) -> int:
    from .train.loop import train

    cfg = TrainConfig.from_dict(vars(args))  # the parser's other options (--resume, ...) are not config
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _evaluate(args) -> int:
    from .api import load_model, run_flip
    from .data.sources import load_source
    from .data.transforms import Preprocess
    from .eval.protocol import evaluate
    from .eval.report import format_summary, write_report
    from .checkpoint import resolve_checkpoint, run_dir_of
    from .device import resolve_device

    device = resolve_device(args.device)
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    out = Path(args.out) if args.out else run_dir_of(resolve_checkpoint(args.run)) / "eval"
    with _model_data(args, ckpt) as data:
        ds = load_source(data, pre)
    score = args.score or ckpt.get("score", "cosine")
    flip = run_flip(ckpt) if args.flip is None else args.flip
    result = evaluate(model, pre, ds, pairs_file=args.pairs, score=score, flip=flip, device=device, seed=args.seed)
    report = result.report
    write_report(report, result.scores, result.same, out, result.baseline_scores)
    print(f"{args.data}: {out / 'report.json'}")
    print(format_summary(report))
    return 0


def _verify(args) -> int:
    from .api import load

    verifier = load(args.run, device="cpu", align=args.align)
    threshold = args.threshold if args.threshold is not None else verifier.threshold
    if threshold is None:
        raise SiamkitError(f"{args.run} has no calibrated threshold (trained without held-out identities); pass --threshold")
    s = verifier.score(args.image1, args.image2)
    print(f"score {s:.4f}  threshold {threshold:.4f}  {'SAME' if s >= threshold else 'DIFFERENT'}")
    return 0


def _embed(args) -> int:
    import io

    import numpy as np

    from .api import load_model, run_flip
    from .data.sources import load_source
    from .data.transforms import Preprocess
    from .eval.embed import embed_images
    from .device import resolve_device
    from .fileio import atomic_write_bytes

    if not args.out.endswith(".npz"):
        raise SiamkitError(f"--out {args.out} must end in .npz")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    with _model_data(args, ckpt) as data:
        ds = load_source(data, pre)
    emb = embed_images(model, ds.images, pre, device, flip=run_flip(ckpt) if args.flip is None else args.flip)
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, labels=ds.labels, names=np.array(ds.names), paths=np.array(ds.paths))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(emb)} embeddings of dimension {emb.shape[1]} -> {args.out}")
    return 0


@contextmanager
def _model_data(args, ckpt: dict):
    """--data as the model should see it: with --align, an aligned copy in a temporary folder (removed after)."""
    from .faces.use import align_data, is_aligned_folder, warn_mismatch

    alignment = ckpt.get("alignment")
    if not args.align:
        warn_mismatch(alignment, is_aligned_folder(args.data), f"the images of {args.data}")
        yield args.data
        return
    from .faces.detect import check_installed

    check_installed()
    warn_mismatch(alignment, True, f"the images of {args.data} (--align)")
    with tempfile.TemporaryDirectory(prefix="siamkit-align-") as tmp:
        yield align_data(args.data, alignment, Path(tmp) / "aligned")


def _align(args) -> int:
    from .faces.folder import AlignOptions, align_folder

    opts = AlignOptions(size=args.size, margin=args.margin, pick=args.pick, undetected=args.undetected)
    align_folder(args.src, args.dst, opts, workers=args.workers, progress=not args.no_progress)
    return 0


def _add_align_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--align", action="store_true",
                   help="detect and align the face of each raw photo first, as `siamkit align` does "
                        "(needs: pip install \"siamkit[align]\")")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="siamkit", description="Train and evaluate Siamese networks for verification.")
    parser.add_argument("--version", action="version", version=f"siamkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.train_parser = _train_parser(sub)

    p = sub.add_parser("evaluate", help="verification report of a trained model on a data set")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data", required=True, help=sources_help())
    p.add_argument("--pairs", default=None, help="LFW-format pairs.txt (folds = its sets)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the embedding of the mirrored image (default: as the run calibrated its threshold)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.add_argument("--score", choices=("cosine", "euclidean"), default=None, help="default: the model's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the impostor pairs (no --pairs)")
    _add_align_flag(p)

    p = sub.add_parser("verify", help="do two images show the same identity?")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--threshold", type=float, default=None, help="default: the threshold calibrated in training")
    _add_align_flag(p)

    p = sub.add_parser("embed", help="write embeddings of a data set to an .npz file")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="FILE.npz")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the embedding of the mirrored image (default: as the run was evaluated)")
    p.add_argument("--device", default="auto")
    _add_align_flag(p)

    p = sub.add_parser("align", help="detect, landmark and align the faces of a folder of photos into DST",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="folder of photos: one sub-folder per identity, or flat")
    p.add_argument("dst", help="output folder: the aligned crops at the same relative paths, and align_report.json")
    p.add_argument("--size", type=int, default=112, help="side of the square aligned crop, in pixels")
    p.add_argument("--margin", type=float, default=0.0, help="extra border around the face, as a fraction of it per side")
    p.add_argument("--pick", choices=("largest", "center"), default="largest",
                   help="which face of a photo with several: the largest, or the one nearest the centre")
    p.add_argument("--undetected", choices=("skip", "frame"), default="skip",
                   help="photos without a detected face: skip them, or align them with the whole frame as the face "
                        "(for tight crops; listed apart in the report)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `train`'s options resolved: flags > --config file or --recipe > TrainConfig defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.config:
            start = TrainConfig.read_options(args.config)
        else:
            start = RECIPES[source_of(args.data).recipe if args.recipe == "auto" else args.recipe]
        # The file's or the recipe's options become the defaults, so that flags given here override them.
        parser.train_parser.set_defaults(**start)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    # The command line speaks in one-line messages: Pillow's warnings about a file (decompression bomb, truncated
    # TIFF) only repeat what siamkit's own "skipped" line says, with a source line attached.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    try:
        args = parse_args(argv)
        return {"train": _train, "evaluate": _evaluate, "verify": _verify, "embed": _embed,
                "align": _align}[args.command](args)
    except SiamkitError as e:
        print(f"siamkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file siamkit writes is replaced atomically: an interrupt leaves the old or the new one, never half.
        print("siamkit: interrupted; files written so far are intact (checkpoints are replaced atomically)", file=sys.stderr)
        return 130
    except OSError as e:
        # Last resort for a file problem no check foresaw: still one line, never a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"siamkit: error: {where}{e.strerror or e}; check the path, its permissions and the free disk space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
