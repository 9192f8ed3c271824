"""`siamkit evaluate`: a model's verification report on pairs of a data set, or its identification report
(--protocol identification: --probes searched in --gallery), each beside the raw-pixel baseline."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SiamkitError
from .common import load_model_data, source_for_model, views


def run(args: argparse.Namespace) -> int:
    from ..api import load_run, run_flip, run_shifts
    from ..data.transforms import Preprocess
    from ..eval.protocol import evaluate
    from ..eval.report import REPORT_FILES, format_summary, write_report
    from ..device import resolve_device
    from ..models.zoo import builtin_model
    from ..outputs import check_report_files, existing_inputs, is_run_folder, run_inputs

    if args.protocol == "identification" and (args.pairs or args.calibrate):
        from ..options import one_of

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
    flip, shifts = views(args, ckpt)
    if args.protocol == "identification":
        return _identification(args, model, ckpt, pre, device, out)
    if args.data is None:
        raise SiamkitError("evaluate needs --data (or --protocol identification with --gallery and --probes)")
    own_views = (flip, shifts) == (run_flip(ckpt), run_shifts(ckpt))
    if args.calibrate and (score != ckpt.get("score", "cosine") or not own_views):
        # verify scores with the run's own score and views: thresholds found otherwise would not fit them.
        raise SiamkitError("--calibrate finds thresholds for the run's own --score, --flip and --shifts; drop those "
                           "options")
    if args.calibrate:
        from ..calibration import prepare_calibration

        previous = prepare_calibration(run_dir, ckpt)  # before the report: a run it cannot calibrate gets none
    ds = load_model_data(args, ckpt, pre)
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
        from ..calibration import calibration_entry, record_calibration

        entry = calibration_entry(report, f"{args.data} (evaluate --calibrate)")
        path = record_calibration(run_dir, entry, previous=previous)
        print(f"calibrated: {path} now holds these thresholds (the previous ones are kept in its history); "
              f"verify uses them")
    return 0


def _identification(args: argparse.Namespace, model, ckpt, pre, device, out) -> int:
    import numpy as np

    from ..eval.baseline import pixel_embeddings
    from ..eval.embed import embed_images
    from ..eval.identification import IDENTIFICATION_BASELINE_KEYS, format_identification, identification_report
    from ..fileio import atomic_write_json
    from ..gallery import exact_scores

    if not args.gallery or not args.probes:
        raise SiamkitError("--protocol identification needs --gallery FOLDER and --probes FOLDER")
    alignment = ckpt.get("alignment")
    gallery = source_for_model(args.gallery, alignment, pre)
    probes = source_for_model(args.probes, alignment, pre)
    score = args.score or ckpt.get("score", "cosine")
    flip, shifts = views(args, ckpt)
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
    report["baseline"] = {key: pixels[key] for key in IDENTIFICATION_BASELINE_KEYS if key in pixels}
    if args.baseline_dlib and not ckpt.get("builtin"):  # (the built-in dlib model would be compared with itself)
        from ..eval.dlib_baseline import dlib_identification_baseline

        report["baseline_dlib"] = dlib_identification_baseline(gallery, probes, probe_ids, device)
    atomic_write_json(out / "identification.json", report)
    print(f"gallery {args.gallery}, probes {args.probes}: {out / 'identification.json'}")
    print(format_identification(report, report["baseline"]))
    return 0
