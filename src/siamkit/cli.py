"""Command line: siamkit train | evaluate | verify | export | enroll | identify | embed | align. The train options are
generated from TrainConfig."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .errors import SiamkitError
from .eval.verification import MAX_GENUINE_PAIRS

# Commands whose parser needs no PyTorch: an exported .onnx model verifies in an environment without it.
TORCH_FREE_COMMANDS = ("verify", "identify", "embed", "serve", "serve-keys", "serve-gallery")
TRAIN_HELP = "train a Siamese network, then evaluate it on held-out identities"


class _Parser(argparse.ArgumentParser):
    """argparse, but bad options end in one 'siamkit: error:' line like every other error."""

    def error(self, message: str):
        command = self.prog.split()[-1]
        raise SiamkitError(f"{message} (see siamkit {command + ' ' if command != 'siamkit' else ''}--help)")


def _train_parser(sub, start: TrainStart) -> argparse.ArgumentParser:
    from .config import GROUPS, RECIPES, TrainConfig
    from .options import DefaultsHelpFormatter, add_arguments

    p = sub.add_parser("train", help=TRAIN_HELP, formatter_class=DefaultsHelpFormatter,
                       description=f"{TRAIN_HELP}. The defaults shown are what this command runs on {start.describe()}: "
                                   f"`siamkit train --data DATA --help` shows another data set's.")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_arguments(p, TrainConfig, groups, defaults=start.config())
    g = groups["run"]
    g.add_argument("--config", default=start.config_file, metavar="CONFIG_JSON",
                   help="start from a run's config.json (options given here override it)")
    g.add_argument("--recipe", default=start.recipe, choices=("auto", *RECIPES),
                   help="start from a set of options measured to work well (docs/results.md); "
                        "auto = dlib-finetune with --pretrained dlib, else the data's: faces for face folders and "
                        "the built-in faces, none for digits; options given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="replace the run folder in --out, if siamkit made it and it holds nothing else "
                        "(--overwrite is the same flag)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class TrainStart:
    """What `siamkit train`'s defaults come from: --data, --recipe and --pretrained (TrainConfig.for_data), or a
    run's config.json (--config). Read before the real parse, so that --help shows the defaults that run."""

    data: str = "att"
    recipe: str = "auto"
    pretrained: str = "none"
    config_file: str | None = None

    @classmethod
    def of(cls, argv: list[str]) -> "TrainStart":
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        for name, value in dataclasses.asdict(cls()).items():
            pre.add_argument("--" + name.replace("_", "-").removesuffix("-file"), dest=name, default=value)
        return cls(**vars(pre.parse_known_args(argv)[0]))

    def config(self):
        from .config import TrainConfig

        if self.config_file:
            return TrainConfig(**TrainConfig.read_options(self.config_file))
        return TrainConfig.for_data(self.data, self.recipe, pretrained=self.pretrained)

    def describe(self) -> str:
        if self.config_file:
            return f"--config {self.config_file}"
        return f"--data {self.data}" + (f" --recipe {self.recipe}" if self.recipe != "auto" else "") + (
            f" --pretrained {self.pretrained}" if self.pretrained != "none" else "")


def _train(args) -> int:
    from .config import TrainConfig
    from .train.loop import train

    cfg = TrainConfig.from_dict(vars(args))  # the parser's other options (--resume, ...) are not config
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
          inputs=[args.config] if args.config else [])
    return 0


def _evaluate(args) -> int:
    from .api import load_run, run_flip, run_shifts
    from .data.transforms import Preprocess
    from .eval.protocol import evaluate
    from .eval.report import REPORT_FILES, format_summary, write_report
    from .device import resolve_device
    from .models.zoo import builtin_model
    from .outputs import check_report_files, existing_inputs, is_run_folder, run_inputs

    if args.protocol == "identification" and (args.pairs or args.calibrate):
        from .options import one_of

        raise one_of("--protocol identification", "--pairs" if args.pairs else "--calibrate",
                     "belong to different evaluations (--pairs and --calibrate are verification's)")
    device = resolve_device(args.device)
    model, ckpt, run_dir = load_run(args.run, device)
    out = Path(args.out) if args.out else run_dir / "eval"
    # A run's own eval/ (or a built-in model's, in the cache) is the report evaluate replaces; any other folder's
    # reports are replaced only when asked.
    own = args.out is None and (is_run_folder(run_dir) or builtin_model(args.run) is not None)
    check_report_files(out, ("identification.json",) if args.protocol == "identification" else REPORT_FILES,
                       [*run_inputs(args.run), *existing_inputs([args.data, args.pairs, args.gallery, args.probes])],
                       force=args.force or own)
    pre = Preprocess.from_dict(ckpt["preprocess"])
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
    ds = _load_model_data(args, ckpt, pre)
    result = evaluate(model, pre, ds, pairs_file=args.pairs, score=score, flip=flip, shifts=shifts, device=device,
                      seed=args.seed, max_genuine_pairs=args.max_genuine_pairs or None,
                      baseline_dlib=args.baseline_dlib and not ckpt.get("builtin"))
    report = result.report
    write_report(report, result.scores, result.same, out, result.baseline_scores)
    print(f"{args.data}: {out / 'report.json'}")
    print(format_summary(report))
    if ckpt.get("threshold_source"):  # a built-in model's own threshold, which verify uses until --calibrate
        print(f"default threshold {ckpt['threshold']:g}: {ckpt['threshold_source']}")
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
    if args.pairs is not None:
        from .outputs import check_output_file, existing_inputs, run_inputs

        check_output_file(args.out, [*run_inputs(args.run), *existing_inputs([args.pairs])], args.force)
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
    from .api import open_run
    from .export import check_export_out, check_images, export_run, same_decisions
    from .outputs import existing_inputs, run_inputs

    check_export_out(args.format, args.out, [*run_inputs(args.run), *existing_inputs([args.data])], args.force)
    ckpt, run_dir = open_run(args.run)  # the checkpoint, read once; export_run builds the model from it
    ds, what = check_images(ckpt, args.data)
    result = export_run(args.run, args.format, args.out, ds.images, opened=(ckpt, run_dir))
    meta = result["metadata"]
    line = (f"{args.format} export -> {args.out}; checked on {len(ds)} images ({what}): max abs difference "
            f"{result['max_abs_diff']:.1e} (limit 1e-4)")
    if meta["calibration"] is not None:
        differ, n = same_decisions(ds, result["exported"], result["reference"], meta["score"],
                                   meta["calibration"]["threshold"])
        line += f"; {n - differ} of {n} pair decisions the same"
    print(line)
    return 0


def _source_for_model(data: str, alignment: dict | None, pre):
    """A folder or built-in source decoded for a model; for one that reads dlib's face chips, its chips (cut once
    into the cache, faces/chip_data.py)."""
    from .data.sources import load_source
    from .faces.chips import is_dlib_chip

    if is_dlib_chip(alignment):
        from .faces.chip_data import chip_folder

        data = chip_folder(data)
    return load_source(data, pre)


def _enroll(args) -> int:
    from .gallery import GALLERY_FILE, load_gallery, update_gallery

    out = Path(args.out)
    if args.remove and (args.data is not None or args.add):
        from .options import one_of

        raise one_of("--remove", "--data/--add", "change the gallery in opposite ways (run enroll once for each)")
    if args.remove:
        load_gallery(out)  # one line if there is none, before anything is created
        gallery = update_gallery(out, lambda g: _remove_people(g, args.remove))
        print(f"removed {', '.join(args.remove)}: {len(gallery.names)} identities ({len(gallery.labels)} images) "
              f"in {out / GALLERY_FILE}")
        return 0
    if args.run is None or args.data is None:
        raise SiamkitError("enroll needs RUN and --data GALLERY_FOLDER (or --remove NAME)")
    if args.add and args.force:
        raise SiamkitError("--add adds people to the gallery and --force replaces it: pass only one of them")
    from .api import load
    from .gallery import enroll_change, model_probe, new_gallery
    from .models.zoo import builtin_model
    from .outputs import check_not_input, existing_inputs, run_inputs
    from .verifier import require_finite

    check_not_input(out / GALLERY_FILE, [*run_inputs(args.run), *existing_inputs([args.data])])
    if (out / GALLERY_FILE).exists() and not (args.add or args.force):
        raise SiamkitError(f"{out / GALLERY_FILE} exists; pass --add to add people to it, --force to replace it, or "
                           f"another --out")
    verifier = load(args.run)
    probe = model_probe(verifier)
    if args.add:
        load_gallery(out).check_model(probe, args.run)  # before embedding anything
    ds = _source_for_model(args.data, verifier.alignment, verifier.preprocess)
    paths = [str(Path(ds.root) / p) if ds.root else p for p in ds.paths]
    embeddings = require_finite(verifier.embed_pixels(ds.images, progress=not args.no_progress), paths)
    new = new_gallery(embeddings, ds.labels, ds.names, paths, score=verifier.score_name,
                      model=args.run if builtin_model(args.run) else str(Path(args.run).resolve()),
                      probe_embedding=probe,
                      preprocess=verifier.preprocess.to_dict(), calibration=verifier.calibration)
    gallery = update_gallery(out, enroll_change(new, probe, args.run, add=args.add, replace=args.force))
    print(f"enrolled {len(ds.names)} identities ({len(ds)} images) from {args.data}: {len(gallery.names)} identities "
          f"({len(gallery.labels)} images) in {out / GALLERY_FILE}")
    return 0


def _remove_people(gallery, names: list[str]):
    for name in names:
        gallery = gallery.remove(name)
    return gallery


def _identify(args) -> int:
    from . import load
    from .calibration import pick_threshold
    from .gallery import load_gallery

    if args.top_k < 1:
        raise SiamkitError(f"--top-k must be at least 1, got {args.top_k}")
    _refuse_threshold_beside_far(args)
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


def _evaluate_identification(args, model, ckpt, pre, device, out) -> int:
    import numpy as np

    from .eval.baseline import pixel_embeddings
    from .eval.embed import embed_images
    from .eval.identification import format_identification, identification_report
    from .fileio import atomic_write_json
    from .gallery import exact_scores

    if not args.gallery or not args.probes:
        raise SiamkitError("--protocol identification needs --gallery FOLDER and --probes FOLDER")
    alignment = ckpt.get("alignment")
    gallery = _source_for_model(args.gallery, alignment, pre)
    probes = _source_for_model(args.probes, alignment, pre)
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


def _serve(args) -> int:
    from .serve.command import serve, serve_keys

    return serve(args) if args.command == "serve" else serve_keys(args)


def _serve_gallery(args) -> int:
    from .serve.npz import serve_gallery

    return serve_gallery(args)


def _embed(args) -> int:
    from .exported import is_exported
    from .outputs import check_output_file, existing_inputs, run_inputs

    if not args.out.endswith(".npz"):
        raise SiamkitError(f"--out {args.out} must end in .npz")
    check_output_file(args.out, [*run_inputs(args.run), *existing_inputs([args.data])], args.force)
    if is_exported(args.run):  # before anything imports torch
        return _embed_exported(args)
    import io

    import numpy as np

    from .api import load_model
    from .data.transforms import Preprocess
    from .eval.embed import embed_images
    from .device import resolve_device
    from .fileio import atomic_write_bytes
    from .verifier import require_finite

    device = resolve_device(args.device)
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    ds = _load_model_data(args, ckpt, pre)
    flip, shifts = _views(args, ckpt)
    emb = embed_images(model, ds.images, pre, device, flip=flip, shifts=shifts)
    require_finite(emb, [os.path.join(ds.root, p) if ds.root else p for p in ds.paths])
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
    """(--data as the model should see it, whether that is a temporary folder): with --align, an aligned copy in a
    temporary folder (removed after); for a model that reads dlib's face chips, the chips cut into the cache
    (faces/chip_data.py)."""
    from .faces.chips import is_dlib_chip
    from .faces.use import align_data, check_chip_templates, is_aligned_folder, warn_mismatch

    alignment = ckpt.get("alignment")
    if is_dlib_chip(alignment):
        from .faces.chip_data import chip_folder

        yield chip_folder(args.data, args.cache_dir), False
        return
    check_chip_templates(alignment, args.data)
    if not args.align:
        warn_mismatch(alignment, is_aligned_folder(args.data), f"the images of {args.data}")
        yield args.data, False
        return
    from .faces.detect import check_installed

    check_installed()
    warn_mismatch(alignment, True, f"the images of {args.data} (--align)")
    with tempfile.TemporaryDirectory(prefix="siamkit-align-") as tmp:
        yield align_data(args.data, alignment, Path(tmp) / "aligned"), True


def _align(args) -> int:
    from .faces.folder import AlignOptions, align_folder

    opts = AlignOptions.for_template(args.template, args.size, args.margin, pick=args.pick, undetected=args.undetected)
    align_folder(args.src, args.dst, opts, workers=args.workers, progress=not args.no_progress, force=args.force)
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


def _load_model_data(args, ckpt: dict, pre):
    """--data as the model sees it (_model_data), decoded through the decoded cache; an aligned temporary copy
    (--align) is decoded into memory instead, since a cache of a folder removed right after would only take disk space."""
    from .data.cache import load_data

    with _model_data(args, ckpt) as (data, temporary):
        return load_data(data, pre, "none" if temporary else args.cache_dir)


def build_parser(torch_free: bool = False, train_start: TrainStart = TrainStart()) -> argparse.ArgumentParser:
    """The command line; ``torch_free``: only the parts the TORCH_FREE_COMMANDS need are complete; ``train_start``:
    where `train`'s defaults come from (a plain `siamkit train`'s by default)."""
    parser = _Parser(prog="siamkit", description="Train and evaluate Siamese networks for verification.")
    parser.add_argument("--version", action="version", version=f"siamkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.train_parser = sub.add_parser("train", help=TRAIN_HELP) if torch_free else _train_parser(sub, train_start)
    if torch_free:
        sources_help = lambda: "a data folder or built-in source"  # noqa: E731
    else:
        from .config import sources_help

    _evaluate_parser(sub, sources_help)

    p = sub.add_parser("verify", help="do two images show the same identity?")
    p.add_argument("run", help="run folder, checkpoint file, exported .onnx file or built-in model (dlib)")
    p.add_argument("image1", nargs="?")
    p.add_argument("image2", nargs="?")
    p.add_argument("--threshold", type=float, default=None,
                   help="default: the run's calibrated threshold (calibration.json, else the training's)")
    p.add_argument("--far", type=float, default=None,
                   help="use the threshold calibrated at this false-accept rate (1e-1, 1e-2 or 1e-3)")
    p.add_argument("--pairs", default=None, metavar="PAIRS_CSV",
                   help="verify many pairs: a CSV file of two image paths per row (relative to its folder)")
    p.add_argument("--out", default=None, metavar="DECISIONS_CSV", help="with --pairs: score, threshold, decision")
    _add_force_flag(p, "replace the file in --out")
    _add_align_flag(p)

    p = sub.add_parser("export", help="export the embedding network (ONNX or TorchScript) with its preprocessing "
                                      "and thresholds, checked against PyTorch on the spot")
    p.add_argument("run", help="run folder, checkpoint file or built-in model (dlib)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="FILE.onnx, or FILE.pt for TorchScript (metadata in FILE.pt.json)")
    p.add_argument("--data", default=None, help="images to check the export on (default: the run's held-out identities)")
    _add_force_flag(p, "replace the file in --out (and its sidecar)")

    p = sub.add_parser("enroll", help="embed a folder-per-identity gallery into an index on disk, for identify")
    p.add_argument("run", nargs="?", help="run folder, checkpoint file or built-in model (dlib)")
    p.add_argument("--data", default=None, help="folder of identity sub-folders to enroll")
    p.add_argument("--out", required=True, metavar="GALLERY_DIR", help="where the gallery lives (gallery.npz)")
    p.add_argument("--add", action="store_true", help="add --data's people to the gallery in --out")
    p.add_argument("--remove", action="append", default=None, metavar="NAME", help="take a person out (repeatable)")
    _add_force_flag(p, "replace the gallery in --out with a new one")
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
    p.add_argument("run", help="run folder, checkpoint file, built-in model (dlib) or exported .onnx file (then --data "
                               "is a folder)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="FILE.npz")
    _add_force_flag(p, "replace the file in --out")
    _add_views_flags(p)
    p.add_argument("--device", default="auto")
    _cache_option(p)
    _add_align_flag(p)

    _align_parser(sub)
    _serve_parsers(sub)
    _serve_gallery_parser(sub)
    return parser


def _serve_gallery_parser(sub) -> None:
    from .options import DefaultsHelpFormatter

    p = sub.add_parser("serve-gallery", formatter_class=DefaultsHelpFormatter,
                       help="import a siamkit enroll gallery.npz into a server's gallery, or export one to a "
                            "gallery.npz for siamkit identify")
    p.add_argument("action", choices=("import", "export"))
    p.add_argument("file", metavar="GALLERY",
                   help="import: a gallery.npz or its folder; export: a folder (FOLDER/gallery.npz)")
    p.add_argument("--gallery", required=True, help="the server's gallery (as in /v1/galleries/GALLERY/...)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default="serve-data", help="the server's folder of galleries (galleries.sqlite)")
    where.add_argument("--db", default=None, metavar="URL", help="the server's postgresql://... (instead of --data-dir)")
    p.add_argument("--skip-existing", action="store_true", help="import: leave out identities already in the gallery")
    _add_force_flag(p, "export: replace FOLDER/gallery.npz")


def _serve_parsers(sub) -> None:
    from .options import DefaultsHelpFormatter

    p = sub.add_parser("serve", help="serve a model over HTTP: verify, embed, enroll and identify (needs: pip install "
                                     "\"siamkit[serve]\")", formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint file, exported .onnx file or built-in model (dlib)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; other than a loopback address only with "
                                                      "--api-keys")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--data-dir", default="serve-data", help="folder of the galleries (galleries.sqlite)")
    p.add_argument("--db", default=None, metavar="URL", help="postgresql://... to share galleries between servers "
                                                              "(none: SQLite in --data-dir)")
    p.add_argument("--max-batch", type=_at_least(1), default=32,
                   help="images per forward pass at most, from concurrent requests (1 = batching off)")
    p.add_argument("--max-wait-ms", type=_at_least(0, float), default=5.0,
                   help="how long the first waiting image waits for others to join its batch")
    p.add_argument("--api-keys", default=None, metavar="KEYS_FILE",
                   help="require API keys from this file (siamkit serve-keys create); none = open, on loopback only")
    p.add_argument("--cors", nargs="+", default=None, metavar="ORIGIN",
                   help="allow browser pages from these origins to call the API (none = no CORS)")
    p.add_argument("--max-upload-mb", type=_at_least(0.001, float), default=10.0, help="largest request body, in MB")
    p.add_argument("--max-pixels", type=_at_least(1), default=40_000_000,
                   help="largest image, in pixels, read from its header before decoding")
    _add_align_flag(p)
    p.add_argument("--ssl-certfile", default=None, help="TLS: the certificate (PEM), passed to uvicorn")
    p.add_argument("--ssl-keyfile", default=None, help="TLS: its private key (PEM), passed to uvicorn")

    p = sub.add_parser("serve-keys", help="manage the API keys of siamkit serve", formatter_class=DefaultsHelpFormatter)
    p.add_argument("action", choices=("create",), help="create: add a key and print its token once")
    p.add_argument("--file", required=True, help="the keys file (only hashes are stored; made if missing)")
    p.add_argument("--scope", choices=("read", "write"), default="read",
                   help="read: verify, embed, identify, list; write: also enroll and delete")


def _at_least(low, kind=int):
    """An argparse type: a ``kind`` number of at least ``low``, else one error line."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is below the least value, {low:g}")
        return value

    return parse


def _evaluate_parser(sub, sources_help) -> None:
    p = sub.add_parser("evaluate", help="verification report of a trained model on a data set")
    p.add_argument("run", help="run folder, checkpoint file or built-in model (dlib)")
    p.add_argument("--data", default=None, help=sources_help())
    p.add_argument("--pairs", default=None, help="LFW-format pairs.txt (folds = its sets)")
    p.add_argument("--protocol", choices=("verification", "identification"), default="verification",
                   help="identification: 1:N search of --probes against --gallery (rank-1/5, CMC, mAP, open set)")
    p.add_argument("--gallery", default=None, help="identification: folder of enrolled identities")
    p.add_argument("--probes", default=None,
                   help="identification: folder of probe images (identities not in --gallery are unknowns)")
    _add_views_flags(p)
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval; for a built-in model, its folder "
                                               "in the cache)")
    p.add_argument("--score", choices=("cosine", "euclidean"), default=None, help="default: the model's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the impostor pairs (no --pairs)")
    p.add_argument("--calibrate", action="store_true",
                   help="store this report's thresholds in the run (RUN/calibration.json, the previous ones kept "
                        "in its history; for a built-in model, its folder in the cache: "
                        "$SIAMKIT_CACHE_DIR/models/NAME/calibration.json): verify then uses them")
    p.add_argument("--max-genuine-pairs", type=int, default=MAX_GENUINE_PAIRS,
                   help="no --pairs: draw at most this many genuine pairs (seeded; 0 = every one)")
    p.add_argument("--no-baseline-dlib", dest="baseline_dlib", action="store_false",
                   help="leave out the second baseline: the off-the-shelf dlib face model on the same pairs "
                        "(docs/face-model.md)")
    _add_force_flag(p, "replace the report files in --out (a run's own eval/ is replaced without it)")
    _cache_option(p)
    _add_align_flag(p)


def _align_parser(sub) -> None:
    p = sub.add_parser("align", help="detect, landmark and align the faces of a folder of photos into DST",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="folder of photos: one sub-folder per identity, or flat")
    p.add_argument("dst", help="output folder: the aligned crops at the same relative paths, and align_report.json")
    p.add_argument("--template", choices=("siamkit", "dlib"), default="siamkit",
                   help="siamkit: the 5 landmarks warped onto siamkit's template; dlib: dlib's own 150 px face chip "
                        "(dlib.get_face_chip, padding 0.25), what the built-in dlib model reads")
    p.add_argument("--size", type=int, default=None, help="side of the square aligned crop, in pixels (default: 112; "
                                                          "dlib's chip is 150)")
    p.add_argument("--margin", type=float, default=None,
                   help="extra border around the face, as a fraction of it per side (default 0)")
    p.add_argument("--pick", choices=("largest", "center"), default="largest",
                   help="which face of a photo with several: the largest, or the one nearest the centre")
    p.add_argument("--undetected", choices=("skip", "frame"), default="skip",
                   help="photos without a detected face: skip them, or align them with the whole frame as the face "
                        "(for tight crops; listed apart in the report)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU core)")
    _add_force_flag(p, "write into a DST that holds other files (crops of the same name are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_force_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--force: the one spelling, in every command, for "replace what exists" (outputs.py says what never is)."""
    p.add_argument("--force", action="store_true", help=what)


def _cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="folder of decoded caches (default: as siamkit train; none = decode into memory, no cache)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `train`'s options resolved: flags > --config file or the recipe (TrainConfig.for_data).

    `train`'s parser is built with the resolved values as its defaults, so `siamkit train --help` shows what runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [w for w in argv if not w.startswith("-")]
    if not words or words[0] != "train":
        return build_parser(torch_free=bool(words) and words[0] in TORCH_FREE_COMMANDS).parse_args(argv)
    start = TrainStart.of(argv)
    parser = build_parser(train_start=start)
    args = parser.parse_args(argv)
    final = TrainStart(args.data, args.recipe, args.pretrained, args.config)
    if final != start and not start.config_file:  # an abbreviated --dat or --pre that only the full parser reads
        parser = build_parser(train_start=final)
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
                "export": _export, "enroll": _enroll, "identify": _identify, "align": _align,
                "serve": _serve, "serve-keys": _serve, "serve-gallery": _serve_gallery}[args.command](args)
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
