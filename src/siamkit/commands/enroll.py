"""`siamkit enroll`: embed a folder-per-identity gallery into GALLERY_DIR/gallery.npz (or add, remove people)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SiamkitError
from .common import source_for_model


def run(args: argparse.Namespace) -> int:
    from ..gallery import GALLERY_FILE, load_gallery, update_gallery

    out = Path(args.out)
    if args.remove and (args.data is not None or args.add):
        from ..options import one_of

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
    from ..api import load
    from ..gallery import enroll_change, model_probe, new_gallery
    from ..models.zoo import builtin_model
    from ..outputs import check_not_input, existing_inputs, run_inputs
    from ..verifier import require_finite

    check_not_input(out / GALLERY_FILE, [*run_inputs(args.run), *existing_inputs([args.data])])
    if (out / GALLERY_FILE).exists() and not (args.add or args.force):
        raise SiamkitError(f"{out / GALLERY_FILE} exists; pass --add to add people to it, --force to replace it, or "
                           f"another --out")
    verifier = load(args.run)
    probe = model_probe(verifier)
    if args.add:
        load_gallery(out).check_model(probe, args.run)  # before embedding anything
    ds = source_for_model(args.data, verifier.alignment, verifier.preprocess)
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
