"""A `siamkit enroll` gallery.npz into a server's gallery, and a server's gallery out to a gallery.npz.

Import checks the model first, as `siamkit identify` does: the file's model stamp (dimension, score and the model's
embedding of gallery.py's probe image) must match the server gallery's, or the gallery is created with the file's
stamp. Each identity is one enrolment (one transaction): an import cut short leaves whole identities only, and the
same command with --skip-existing finishes it. Export writes what `siamkit identify` reads: the embeddings, the
identities, and the model that made them (its name as the server was started with it, and its probe embedding);
an image's path in the file is ``GALLERY#ID``, the server's image id (what DELETE /v1/galleries/G/images/ID takes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SiamkitError
from ..gallery import GALLERY_FILE, Gallery, load_gallery, new_gallery, save_gallery
from .names import check_gallery_name, check_identity_name
from .store import ModelStamp, Store, StoreUnavailable


@dataclass(frozen=True)
class ImportResult:
    identities: int  # enrolled by this import
    images: int
    skipped: list[str]  # already in the server's gallery (--skip-existing)


def stamp_of(gallery: Gallery) -> ModelStamp:
    """The ModelStamp of the model a gallery.npz was enrolled with."""
    probe = np.asarray(gallery.meta["model_probe"], dtype=np.float32)
    return ModelStamp(str(gallery.meta["model"]), int(gallery.embeddings.shape[1]), gallery.score, probe.tobytes())


def import_npz(store: Store, gallery_name: str, path: str | os.PathLike, *,
               skip_existing: bool = False) -> ImportResult:
    """Enrol every identity of ``path`` (a gallery.npz, or the folder holding one) into the server gallery."""
    check_gallery_name(gallery_name)
    source = load_gallery(path)
    for name in source.names:
        check_identity_name(name)
    stamp = stamp_of(source)
    stored = store.gallery_model(gallery_name)
    if stored is not None and not stored.same_model(stamp):
        raise SiamkitError(f"{path} was enrolled with another model ({stamp.name}, dimension {stamp.dim}, "
                           f"{stamp.score}) than the server's gallery {gallery_name!r} ({stored.name}, dimension "
                           f"{stored.dim}, {stored.score}); import it into another gallery, or enroll its people again "
                           f"with {stored.name}")
    present = {name for name, _ in store.identities(gallery_name)} if stored is not None else set()
    clash = [name for name in source.names if name in present]
    if clash and not skip_existing:
        raise SiamkitError(f"already in the server's gallery {gallery_name!r}: {', '.join(clash[:5])}"
                           f"{', ...' if len(clash) > 5 else ''}; delete them there first, or pass --skip-existing "
                           f"to import only the others")
    store.create_gallery(gallery_name, stamp)
    done = images = 0
    try:
        for label, name in enumerate(source.names):
            rows = np.flatnonzero(source.labels == label)
            if name not in present:
                store.enroll(gallery_name, name, source.embeddings[rows], [source.paths[i] for i in rows])
                done, images = done + 1, images + len(rows)
    except StoreUnavailable as e:
        raise SiamkitError(f"{e}; {done} of {len(source.names) - len(clash)} identities were imported, each whole: "
                           f"run the import again with --skip-existing to add the others") from None
    return ImportResult(done, images, clash)


def export_npz(store: Store, gallery_name: str, out: str | os.PathLike, *, force: bool = False) -> Gallery:
    """Write the server gallery to OUT (a folder: OUT/gallery.npz, as `siamkit enroll --out` writes it)."""
    check_gallery_name(gallery_name)
    stamp = store.gallery_model(gallery_name)
    if stamp is None:
        known = store.galleries()
        raise SiamkitError(f"there is no gallery {gallery_name!r} in this store; its galleries: "
                           f"{', '.join(known[:10]) or 'none'}")
    folder = export_folder(out)
    target = folder / GALLERY_FILE
    if target.exists() and not force:
        raise SiamkitError(f"{target} exists; pass --force to replace it, or another folder")
    ids, identities, embeddings, _ = store.rows(gallery_name)
    names = sorted(set(identities))
    where = {name: k for k, name in enumerate(names)}
    gallery = new_gallery(embeddings.reshape(len(ids), stamp.dim), np.array([where[n] for n in identities],
                          dtype=np.int64), names, [f"{gallery_name}#{int(i)}" for i in ids], score=stamp.score,
                          model=_model_path(stamp.name), probe_embedding=np.frombuffer(stamp.probe, dtype=np.float32),
                          # the store keeps no preprocessing or calibration: identify reads both from the model
                          preprocess={}, calibration=None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SiamkitError(f"cannot create {folder} ({e.strerror}); pass a writable folder") from None
    save_gallery(gallery, folder)
    return gallery


def export_folder(out: str | os.PathLike) -> Path:
    """Where export writes: OUT/gallery.npz, as `siamkit enroll --out OUT` (OUT/gallery.npz itself is taken too)."""
    out = Path(out)
    if out.name == GALLERY_FILE:
        return out.parent
    if out.suffix == ".npz":
        raise SiamkitError(f"export writes FOLDER/{GALLERY_FILE}, which siamkit identify FOLDER reads; pass a folder "
                           f"(or FOLDER/{GALLERY_FILE}), not {out}")
    return out


def _model_path(name: str) -> str:
    """A model the server was started with as a relative path, made absolute (as enroll records it), so that
    identify finds it from any folder; a built-in model's name (dlib) stays a name."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def serve_gallery(args) -> int:
    """siamkit serve-gallery import|export: a gallery.npz in or out of a server's store (--data-dir or --db)."""
    from .store import open_store

    store = open_store(args.db or args.data_dir)
    try:
        _serve_gallery(store, args)
    except StoreUnavailable as e:
        raise SiamkitError(str(e)) from None
    finally:
        store.close()
    return 0


def _serve_gallery(store: Store, args) -> None:
    if args.action == "import":
        done = import_npz(store, args.gallery, args.file, skip_existing=args.skip_existing)
        skipped = f"; skipped {len(done.skipped)} already there" if done.skipped else ""
        print(f"imported {done.identities} identities ({done.images} images) from {args.file} into the gallery "
              f"{args.gallery!r}{skipped}")
    else:
        gallery = export_npz(store, args.gallery, args.file, force=args.force)
        print(f"exported the gallery {args.gallery!r}: {len(gallery.names)} identities ({len(gallery.labels)} "
              f"images) to {export_folder(args.file) / GALLERY_FILE}")
