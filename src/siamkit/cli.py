"""Command line: siamkit train | evaluate | verify | export | enroll | identify | embed | align. The train options are
generated from TrainConfig."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__
from .errors import SiamkitError
from .eval.verification import MAX_GENUINE_PAIRS

# Commands whose parser needs no PyTorch: an exported .onnx model verifies in an environment without it.
TORCH_FREE_COMMANDS = ("verify", "identify", "embed")
TRAIN_HELP = "train a Siamese network, then evaluate it on held-out identities"


class _Parser(argparse.ArgumentParser):
    """argparse, but bad options end in one 'siamkit: error:' line like every other error."""

    def error(self, message: str):
        command = self.prog.split()[-1]
        raise SiamkitError(f"{message} (see siamkit {command + ' ' if command != 'siamkit' else ''}--help)")


def _train_parser(sub) -> argparse.ArgumentParser:
    from .config import GROUPS, RECIPES, TrainConfig
    from .options import add_arguments

    p = sub.add_parser("train", help=TRAIN_HELP,
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
    from .config import TrainConfig
    from .train.loop import train

    cfg = TrainConfig.from_dict(vars(args))  # the parser's other options (--resume, ...) are not config
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _evaluate(args) -> int:
    from .api import load_model, run_flip, run_shifts
    from .data.transforms import Preprocess
    from .eval.protocol import evaluate
    from .eval.report import format_summary, write_report
    from .checkpoint import resolve_checkpoint, run_dir_of
    from .device import resolve_device

    if args.protocol == "identification" and (args.pairs or args.calibrate):
        from .options import one_of

        raise one_of("--protocol identification", "--pairs" if args.pairs else "--calibrate",
                     "belong to different evaluations (--pairs and --calibrate are verification's)")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    run_dir = run_dir_of(resolve_checkpoint(args.run))
    out = Path(args.out) if args.out else run_dir / "eval"
    score = args.score or ckpt.get("score", "cosine")
    flip, shifts = _views(args, ckpt)
    if args.protocol == "identification":
        return _evaluate_identification(args, model, ckpt, pre, device, out)
    if args.data is None:
        raise SiamkitError("evaluate needs --data (or --protocol identification with --gallery and --probes)")
    own_views = (flip, shifts) == (run_flip(ckpt), run_shifts(ckpt))
    if args.calibrate and (score != ckpt.get("score", "cosine") or not own_views):
        # verify scores with the run's own score and views: thresholds found otherwise would not fit them.
        raise SiamkitError("--calibrate finds thresholds for the run's own --score, --flip and --shifts; drop those "
                           "options")
    if args.calibrate:
        from .calibration import prepare_calibration

        previous = prepare_calibration(run_dir, ckpt)  # before the report: a run it cannot calibrate gets none
    with _model_data(args, ckpt) as data:
        ds = _load_model_data(data, pre, args)
    result = evaluate(model, pre, ds, pairs_file=args.pairs, score=score, flip=flip, shifts=shifts, device=device,
                      seed=args.seed, max_genuine_pairs=args.max_genuine_pairs or None)
    report = result.report
    write_report(report, result.scores, result.same, out, result.baseline_scores)
    print(f"{args.data}: {out / 'report.json'}")
    print(format_summary(report))
    if args.calibrate:
        from .calibration import calibration_entry, record_calibration

        entry = calibration_entry(report, f"{args.data} (evaluate --calibrate)")
        path = record_calibration(run_dir, entry, previous=previous)
        print(f"calibrated: {path} now holds these thresholds (the previous ones are kept in its history); "
              f"verify uses them")
    return 0


def _verify(args) -> int:
    from . import load
    from .calibration import pick_threshold

    _refuse_threshold_beside_far(args)
    if (args.pairs is None) == (args.image2 is None):
        raise SiamkitError("give two images, or --pairs PAIRS.csv --out DECISIONS.csv (not both)")
    if args.pairs is not None and (args.out is None or args.image1 is not None):
        raise SiamkitError("--pairs takes no image arguments and needs --out DECISIONS.csv")
    verifier = load(args.run, align=args.align)
    threshold, what = pick_threshold(verifier.calibration, args.threshold, args.far, verifier.score_name)
    if args.pairs is not None:
        from .eval.decisions import verify_pairs_csv

        verify_pairs_csv(verifier, args.pairs, args.out, threshold, what)
        return 0
    s = verifier.score(args.image1, args.image2)
    print(f"score {s:.4f}  threshold {threshold:.4f}  {'SAME' if s >= threshold else 'DIFFERENT'}")
    print(f"threshold: {what}")
    return 0


def _refuse_threshold_beside_far(args) -> None:
    """--threshold beside --far: refused before anything is loaded, in verify and identify alike."""
    if args.threshold is not None and args.far is not None:
        from .calibration import THRESHOLD_OPTIONS_CONFLICT
        from .options import one_of

        raise one_of("--threshold", "--far", THRESHOLD_OPTIONS_CONFLICT)


def _export(args) -> int:
    from .export import check_images, export_run, same_decisions
    from .api import load_model

    if args.format == "onnx" and not args.out.lower().endswith(".onnx"):
        raise SiamkitError(f"--out {args.out} must end in .onnx (siamkit.load and verify recognise the file by it)")
    _, ckpt = load_model(args.run)
    ds, what = check_images(ckpt, args.data)
    result = export_run(args.run, args.format, args.out, ds.images)
    meta = result["metadata"]
    line = (f"{args.format} export -> {args.out}; checked on {len(ds)} images ({what}): max abs difference "
            f"{result['max_abs_diff']:.1e} (limit 1e-4)")
    if meta["calibration"] is not None:
        differ, n = same_decisions(ds, result["exported"], result["reference"], meta["score"],
                                   meta["calibration"]["threshold"])
        line += f"; {n - differ} of {n} pair decisions the same"
    print(line)
    return 0


def _embed_dataset(verifier, ds, progress: bool = True):
    """Embeddings of an IdentityDataset with a run's Verifier, in chunks behind a progress bar."""
    import numpy as np
    from .eval.embed import embed_images
    from .progress import progress_bar

    chunks = [embed_images(verifier.model, ds.images[i:i + 256], verifier.preprocess, verifier.device,
                           flip=verifier.flip, shifts=verifier.shifts)
              for i in progress_bar(range(0, len(ds), 256), desc="embed", unit="chunk", disable=not progress)]
    return np.concatenate(chunks)


def _enroll(args) -> int:
    from pathlib import Path as _Path

    from .gallery import GALLERY_FILE, load_gallery, model_probe, new_gallery, save_gallery

    out = _Path(args.out)
    if args.remove and (args.data is not None or args.add):
        from .options import one_of

        raise one_of("--remove", "--data/--add", "change the gallery in opposite ways (run enroll once for each)")
    if args.remove:
        gallery = load_gallery(out)
        for name in args.remove:
            gallery = gallery.remove(name)
        save_gallery(gallery, out)
        print(f"removed {', '.join(args.remove)}: {len(gallery.names)} identities ({len(gallery.labels)} images) "
              f"in {out / GALLERY_FILE}")
        return 0
    if args.run is None or args.data is None:
        raise SiamkitError("enroll needs RUN and --data GALLERY_FOLDER (or --remove NAME)")
    if (out / GALLERY_FILE).exists() and not args.add:
        raise SiamkitError(f"{out / GALLERY_FILE} exists; pass --add to add people to it, or another --out")
    from .api import load
    from .data.sources import load_source

    verifier = load(args.run)
    probe = model_probe(verifier)
    if args.add:
        gallery = load_gallery(out)
        gallery.check_model(probe, args.run)  # before embedding anything
    ds = load_source(args.data, verifier.preprocess)
    new = new_gallery(_embed_dataset(verifier, ds, not args.no_progress), ds.labels, ds.names,
                      [str(_Path(ds.root) / p) if ds.root else p for p in ds.paths], score=verifier.score_name,
                      model=str(_Path(args.run).resolve()), probe_embedding=probe,
                      preprocess=verifier.preprocess.to_dict(), calibration=verifier.calibration)
    gallery = gallery.add(new) if args.add else new
    save_gallery(gallery, out)
    print(f"enrolled {len(ds.names)} identities ({len(ds)} images) from {args.data}: {len(gallery.names)} identities "
          f"({len(gallery.labels)} images) in {out / GALLERY_FILE}")
    return 0


def _identify(args) -> int:
    from . import load
    from .calibration import pick_threshold
    from .gallery import load_gallery, model_probe

    if args.top_k < 1:
        raise SiamkitError(f"--top-k must be at least 1, got {args.top_k}")
    _refuse_threshold_beside_far(args)
    gallery = load_gallery(args.gallery)
    model = args.model or gallery.meta["model"]
    verifier = load(model)
    gallery.check_model(model_probe(verifier), model)
    threshold, what = pick_threshold(verifier.calibration, args.threshold, args.far, verifier.score_name)
    ids, scores = gallery.search(verifier.embed(args.images), args.top_k, args.backend)
    for image, row_ids, row_scores in zip(args.images, ids, scores):
        best, best_score = gallery.names[row_ids[0]], row_scores[0]
        verdict = best if best_score >= threshold else f"unknown (best {best} {best_score:.4f} < threshold)"
        top = ", ".join(f"{gallery.names[i]} {s:.4f}" for i, s in zip(row_ids, row_scores))
        print(f"{image}: {verdict}\n  top-{len(row_ids)}: {top}")
    print(f"threshold {threshold:.6g}: {what}")
    return 0


def _evaluate_identification(args, model, ckpt, pre, device, out) -> int:
    import numpy as np

    from .data.sources import load_source
    from .eval.baseline import pixel_embeddings
    from .eval.embed import embed_images
    from .eval.identification import format_identification, identification_report
    from .fileio import atomic_write_json
    from .gallery import exact_scores

    if not args.gallery or not args.probes:
        raise SiamkitError("--protocol identification needs --gallery FOLDER and --probes FOLDER")
    gallery, probes = load_source(args.gallery, pre), load_source(args.probes, pre)
    score = args.score or ckpt.get("score", "cosine")
    flip, shifts = _views(args, ckpt)
    g_emb = embed_images(model, gallery.images, pre, device, flip=flip, shifts=shifts)
    p_emb = embed_images(model, probes.images, pre, device, flip=flip, shifts=shifts)
    index = {name: i for i, name in enumerate(gallery.names)}
    probe_ids = np.array([index.get(probes.names[label], -1) for label in probes.labels])
    if not (probe_ids >= 0).any():
        raise SiamkitError(f"no probe in {args.probes} shows anyone enrolled in {args.gallery} (identities are "
                           f"matched by folder name)")
    report = identification_report(exact_scores(p_emb, g_emb, score), gallery.labels, gallery.n_identities,
                                   probe_ids)
    report["score"] = score
    pixels = identification_report(exact_scores(pixel_embeddings(probes.images), pixel_embeddings(gallery.images),
                                                 "cosine"), gallery.labels, gallery.n_identities, probe_ids)
    report["baseline"] = {key: pixels[key] for key in ("rank1", "rank5", "cmc", "map", "open_set") if key in pixels}
    atomic_write_json(out / "identification.json", report)
    print(f"gallery {args.gallery}, probes {args.probes}: {out / 'identification.json'}")
    print(format_identification(report, report["baseline"]))
    return 0


def _embed(args) -> int:
    from .exported import is_exported

    if is_exported(args.run):  # before anything imports torch
        if not args.out.endswith(".npz"):
            raise SiamkitError(f"--out {args.out} must end in .npz")
        return _embed_exported(args)
    import io

    import numpy as np

    from .api import load_model
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
        ds = _load_model_data(data, pre, args)
    flip, shifts = _views(args, ckpt)
    emb = embed_images(model, ds.images, pre, device, flip=flip, shifts=shifts)
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, labels=ds.labels, names=np.array(ds.names), paths=np.array(ds.paths))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(emb)} embeddings of dimension {emb.shape[1]} -> {args.out}")
    return 0


def _embed_exported(args) -> int:
    """embed with an exported .onnx model: onnxruntime, no torch; the views (flip, shifts) are the export's."""
    import io

    import numpy as np

    from .exported import embed_folder, load_exported
    from .fileio import atomic_write_bytes

    if args.flip is not None or args.shifts is not None:
        raise SiamkitError("an exported model mirrors and shifts images (or not) as its run did; drop --flip and "
                           "--shifts")
    out = embed_folder(load_exported(args.run), args.data)
    buf = io.BytesIO()
    np.savez(buf, embeddings=out["embeddings"], labels=out["labels"], names=np.array(out["names"]),
             paths=np.array(out["paths"]))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(out['embeddings'])} embeddings of dimension {out['embeddings'].shape[1]} -> {args.out}")
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


def _add_views_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the embedding of the mirrored image (default: as the run was evaluated and calibrated)")
    p.add_argument("--shifts", action=argparse.BooleanOptionalAction, default=None,
                   help="add the embeddings of four copies shifted by 1/16 of the side (default: as the run was "
                        "evaluated and calibrated, --eval-shifts)")


def _views(args, ckpt: dict) -> tuple[bool, bool]:
    """(flip, shifts): the command line's --flip / --shifts, else the run's own."""
    from .api import run_flip, run_shifts

    return (run_flip(ckpt) if args.flip is None else args.flip,
            run_shifts(ckpt) if args.shifts is None else args.shifts)


def _add_align_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--align", action="store_true",
                   help="detect and align the face of each raw photo first, as `siamkit align` does "
                        "(needs: pip install \"siamkit[align]\")")


def _load_model_data(data: str, pre, args):
    """--data decoded through the decoded cache; an aligned temporary copy (--align) is decoded into memory instead,
    since a cache of a folder removed right after would only take disk space."""
    from .data.cache import load_data

    return load_data(data, pre, "none" if args.align else args.cache_dir)


def build_parser(torch_free: bool = False) -> argparse.ArgumentParser:
    """The command line; ``torch_free``: only the parts the TORCH_FREE_COMMANDS need are complete."""
    parser = _Parser(prog="siamkit", description="Train and evaluate Siamese networks for verification.")
    parser.add_argument("--version", action="version", version=f"siamkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.train_parser = sub.add_parser("train", help=TRAIN_HELP) if torch_free else _train_parser(sub)
    if torch_free:
        sources_help = lambda: "a data folder or built-in source"  # noqa: E731
    else:
        from .config import sources_help

    p = sub.add_parser("evaluate", help="verification report of a trained model on a data set")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data", default=None, help=sources_help())
    p.add_argument("--pairs", default=None, help="LFW-format pairs.txt (folds = its sets)")
    p.add_argument("--protocol", choices=("verification", "identification"), default="verification",
                   help="identification: 1:N search of --probes against --gallery (rank-1/5, CMC, mAP, open set)")
    p.add_argument("--gallery", default=None, help="identification: folder of enrolled identities")
    p.add_argument("--probes", default=None,
                   help="identification: folder of probe images (identities not in --gallery are unknowns)")
    _add_views_flags(p)
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.add_argument("--score", choices=("cosine", "euclidean"), default=None, help="default: the model's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the impostor pairs (no --pairs)")
    p.add_argument("--calibrate", action="store_true",
                   help="store this report's thresholds in the run (RUN/calibration.json, the previous ones kept "
                        "in its history): verify then uses them")
    p.add_argument("--max-genuine-pairs", type=int, default=MAX_GENUINE_PAIRS,
                   help="no --pairs: draw at most this many genuine pairs (seeded; 0 = every one)")
    _cache_option(p)
    _add_align_flag(p)

    p = sub.add_parser("verify", help="do two images show the same identity?")
    p.add_argument("run", help="run folder, checkpoint file or exported .onnx file")
    p.add_argument("image1", nargs="?")
    p.add_argument("image2", nargs="?")
    p.add_argument("--threshold", type=float, default=None,
                   help="default: the run's calibrated threshold (calibration.json, else the training's)")
    p.add_argument("--far", type=float, default=None,
                   help="use the threshold calibrated at this false-accept rate (1e-1, 1e-2 or 1e-3)")
    p.add_argument("--pairs", default=None, metavar="PAIRS_CSV",
                   help="verify many pairs: a CSV file of two image paths per row (relative to its folder)")
    p.add_argument("--out", default=None, metavar="DECISIONS_CSV", help="with --pairs: score, threshold, decision")
    _add_align_flag(p)

    p = sub.add_parser("export", help="export the embedding network (ONNX or TorchScript) with its preprocessing "
                                      "and thresholds, checked against PyTorch on the spot")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="FILE.onnx, or FILE.pt for TorchScript (metadata in FILE.pt.json)")
    p.add_argument("--data", default=None, help="images to check the export on (default: the run's held-out identities)")

    p = sub.add_parser("enroll", help="embed a folder-per-identity gallery into an index on disk, for identify")
    p.add_argument("run", nargs="?", help="run folder or checkpoint file")
    p.add_argument("--data", default=None, help="folder of identity sub-folders to enroll")
    p.add_argument("--out", required=True, metavar="GALLERY_DIR", help="where the gallery lives (gallery.npz)")
    p.add_argument("--add", action="store_true", help="add --data's people to the gallery in --out")
    p.add_argument("--remove", action="append", default=None, metavar="NAME", help="take a person out (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("identify", help="who, of an enrolled gallery, is in each image? (top-k, or unknown)")
    p.add_argument("gallery", metavar="GALLERY_DIR")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threshold", type=float, default=None, help="below it a probe is unknown (default: the "
                   "model's calibrated threshold)")
    p.add_argument("--far", type=float, default=None, help="use the threshold calibrated at this false-accept rate")
    p.add_argument("--backend", choices=("exact", "faiss", "hnsw"), default="exact",
                   help="exact: one matrix product; faiss / hnsw: faiss-cpu's exact or HNSW index")
    p.add_argument("--model", default=None, help="default: the model the gallery was enrolled with")

    p = sub.add_parser("embed", help="write embeddings of a data set to an .npz file")
    p.add_argument("run", help="run folder, checkpoint file or exported .onnx file (then --data is a folder)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="FILE.npz")
    _add_views_flags(p)
    p.add_argument("--device", default="auto")
    _cache_option(p)
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


def _cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="folder of decoded caches (default: as siamkit train; none = decode into memory, no cache)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `train`'s options resolved: flags > --config file or --recipe > TrainConfig defaults."""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    parser = build_parser(torch_free=bool(words) and words[0] in TORCH_FREE_COMMANDS)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .config import RECIPES, TrainConfig
        from .data.sources import source_of

        if args.config:
            start = TrainConfig.read_options(args.config)
        else:
            start = RECIPES[source_of(args.data).recipe if args.recipe == "auto" else args.recipe]
        # The file's or the recipe's options become the defaults, so that flags given here override them.
        parser.train_parser.set_defaults(**start)
        args = parser.parse_args(argv)
        if args.steps and args.epochs and _given_here(parser, argv, ("steps", "epochs")) == {"steps", "epochs"}:
            from .options import one_of

            # (a recipe's or a --config file's --epochs gives way to --steps given here, as every option does)
            raise one_of("--steps", "--epochs", "both set the run's length")
    return args


_UNSET = object()


def _given_here(parser: argparse.ArgumentParser, argv: list[str] | None, dests: tuple[str, ...]) -> set[str]:
    """Which of train's options ``dests`` this command line gives (not a default, a recipe or a --config file)."""
    train = parser.train_parser
    saved = {dest: train.get_default(dest) for dest in dests}
    train.set_defaults(**dict.fromkeys(dests, _UNSET))
    try:
        args = parser.parse_args(argv)
    finally:
        train.set_defaults(**saved)
    return {dest for dest in dests if getattr(args, dest) is not _UNSET}


def _print_any_file_name() -> None:
    """A file name may hold any bytes; Python reads the ones that are not UTF-8 as surrogates, which a UTF-8 locale's
    stdout refuses (UnicodeEncodeError). Print them as the bytes they were, as ls does (stderr already escapes them)."""
    try:
        sys.stdout.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):  # not a text stream of its own (a test's capture, a closed stream)
        pass


def main(argv: list[str] | None = None) -> int:
    # The command line speaks in one-line messages: Pillow's warnings about a file (decompression bomb, truncated
    # TIFF) only repeat what siamkit's own "skipped" line says, with a source line attached.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    _print_any_file_name()
    try:
        args = parse_args(argv)
        return {"train": _train, "evaluate": _evaluate, "verify": _verify, "embed": _embed,
                "export": _export, "enroll": _enroll, "identify": _identify, "align": _align}[args.command](args)
    except SiamkitError as e:
        print(f"siamkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file siamkit writes is replaced atomically: an interrupt leaves the old or the new one, never half.
        print("siamkit: interrupted; files written so far are intact (checkpoints are replaced atomically)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`siamkit verify ... | head -1`): nothing is wrong with siamkit's files. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except OSError as e:
        # Last resort for a file problem no check foresaw: still one line, never a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"siamkit: error: {where}{e.strerror or e}; check the path, its permissions and the free disk space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
