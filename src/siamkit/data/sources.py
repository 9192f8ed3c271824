"""Data sources: a folder of identity sub-folders, or a built-in source by name (digits, Olivetti, LFW).

Every source becomes an IdentityDataset of decoded uint8 images kept in memory, so that an epoch
never decodes a file twice. Built-in sources live in the ``SOURCES`` registry with their default
preprocessing and augmentation; adding one is one ``register_source`` call.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import SiamkitError, warn
from ..progress import progress_bar
from ..registry import Registry
from .binsets import contiguous_folds, read_binset
from .pixels import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, PILLOW_FORMATS, decode_image_array, list_image_folder, too_small, warn_small  # noqa: F401 (imported from here)
from .limits import check_fits_memory
from .record_images import RecordRows, decode_records
from .recordio import RecordFile, identity_names
from .transforms import Preprocess, image_to_uint8


@dataclass
class IdentityDataset:
    """Decoded images with identity labels."""

    # uint8 [N, C, H, W], or a data.rows.LazyRows: the same, memory-mapped from the decoded cache or decoded from a .rec
    images: torch.Tensor
    labels: np.ndarray  # int64 [N], 0..n_identities-1
    names: list[str]  # identity names, indexed by label
    paths: list[str]  # one per image: path relative to the root, or a synthetic id for built-in sets
    root: str = ""
    # A validation set's own pairs (a .bin): (index of the first image, of the second, is-same, fold) per pair
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_identities(self) -> int:
        return len(self.names)

    @property
    def shape_of_image(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, identity_ids: np.ndarray) -> "IdentityDataset":
        """The images of the given identities, with labels renumbered 0..len(identity_ids)-1."""
        identity_ids = np.asarray(sorted(int(i) for i in identity_ids))
        remap = np.full(self.n_identities, -1, dtype=np.int64)
        remap[identity_ids] = np.arange(len(identity_ids))
        keep = np.flatnonzero(remap[self.labels] >= 0)
        return IdentityDataset(
            images=self.images[torch.from_numpy(keep)],
            labels=remap[self.labels[keep]],
            names=[self.names[i] for i in identity_ids],
            paths=[self.paths[i] for i in keep],
            root=self.root,
        )  # no pairs: a validation set's pairs index all its images


@dataclass(frozen=True)
class Source:
    """How a data source is read and what it gets unless the user says otherwise."""

    load: Callable[[str, Preprocess, str | None], IdentityDataset]  # (--data, preprocessing, data_home) -> data set
    image_size: tuple[int, int] = (64, 64)
    center_crop: float = 1.0
    augment: str = "flip-shift"  # what --augment auto means for it (none where mirrored images are other symbols)
    grayscale: bool = False  # one channel by default (greyscale data)
    recipe: str = "faces"  # the options `siamkit train --recipe auto` starts from (config.RECIPES)
    native_size: tuple[int, int] | None = None  # (H, W) of its original images, where faces are detected; None: no faces
    validation_only: bool = False  # pairs to evaluate on (a .bin), nothing to train on


# --data NAME -> Source; anything else given to --data is a folder (FOLDER).
SOURCES: Registry = Registry("--data")
# ``register_source("name", Source(...))``: --data name.
register_source = SOURCES.register
# --data FILE: a data set that comes as one file, by its suffix (".rec"); ``register_file_source(".rec", Source(...))``.
FILE_SOURCES: Registry = Registry("--data")
register_file_source = FILE_SOURCES.register


def source_of(data: str) -> Source:
    """The registry entry of a built-in name, or of a file's suffix, or the folder source."""
    if data in SOURCES:
        return SOURCES[data]
    suffix = os.path.splitext(str(data))[1].lower()
    if suffix in FILE_SOURCES and not os.path.isdir(data):
        return FILE_SOURCES[suffix]
    return FOLDER


def default_preprocess(source: str, image_size=None, center_crop=None, grayscale=False) -> Preprocess:
    """The preprocessing a source gets unless the user overrides it."""
    entry = source_of(source)
    channels = 1 if grayscale or entry.grayscale else 3
    return Preprocess(
        image_size=tuple(image_size) if image_size else entry.image_size,
        center_crop=float(center_crop) if center_crop is not None else entry.center_crop,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
    )


def native_preprocess(source: str) -> Preprocess | None:
    """A built-in source's images as they are (their own size and channels, no crop), or None for one without faces."""
    entry = source_of(source)
    if entry is FOLDER or entry.native_size is None:
        return None
    channels = 1 if entry.grayscale else 3
    return Preprocess(image_size=entry.native_size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)


def load_source(source: str, pre: Preprocess, data_home: str | None = None) -> IdentityDataset:
    """Load ``source`` (a folder or a built-in name) decoded with ``pre``."""
    return source_of(source).load(source, pre, data_home)


def _check_memory(n_images: int, pre: Preprocess) -> None:
    """Before decoding into memory: refuse what would not fit (data/limits.py)."""
    check_fits_memory(n_images, pre.channels, pre.image_size)


def list_folder(root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Identity names and their candidate image files (paths relative to ``root``), sorted; clear errors for
    unusable folders."""
    return list_image_folder(root, tuple(SOURCES))


def decode_image(path: str | os.PathLike, pre: Preprocess, sizes: list | None = None) -> torch.Tensor:
    """Decode one image file; raise ValueError with a short reason if it is unusable (``sizes``: its upright
    (width, height) is appended)."""
    return torch.from_numpy(decode_image_array(path, pre, sizes))



def load_folder(root: str | os.PathLike, pre: Preprocess) -> IdentityDataset:
    """Decode every image of a folder of identity sub-folders, skipping unreadable files with one warning."""
    names, files = list_folder(root)
    root_path = Path(root)
    flat = [(label, rel) for label, paths in enumerate(files) for rel in paths]
    _check_memory(len(flat), pre)

    def work(item: tuple[int, str]):
        sizes: list = []
        try:
            return decode_image(os.path.join(root_path, item[1]), pre, sizes), too_small(sizes[0])
        except ValueError as e:
            return str(e)

    # Pillow releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        decoded = list(pool.map(work, flat))
    bad = [(os.path.join(root_path, path), out) for (_, path), out in zip(flat, decoded) if isinstance(out, str)]
    return _assemble(root_path, names, flat, decoded, bad)


def warn_skipped(bad: list[tuple[str, str]], what: str = "unreadable image(s)") -> None:
    """One warning for everything skipped: [(which image, why), ...], the first five shown."""
    if bad:
        shown = "; ".join(f"{where} ({why})" for where, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warn(f"skipped {len(bad)} {what}: {shown}{more}")


def _assemble(root: Path, names: list[str], flat: list[tuple[int, str]], decoded: list, bad: list[tuple[str, str]],
              what: str = "unreadable image(s)") -> IdentityDataset:
    """The data set of the images that decoded: ``flat`` (label, path) per image, ``decoded`` (image tensor, why too
    small or None) or why unreadable per image, ``bad`` what was skipped (warned about once)."""
    warn_skipped(bad, what)
    warn_small(root, [(path, out[1]) for (_, path), out in zip(flat, decoded) if not isinstance(out, str) and out[1]])
    good = [(label, path, out[0]) for (label, path), out in zip(flat, decoded) if not isinstance(out, str)]
    if not good:
        raise SiamkitError(f"no readable images in {root}; check the files are images Pillow can open")
    used_labels = sorted({label for label, _, _ in good})
    remap = {old: new for new, old in enumerate(used_labels)}
    return IdentityDataset(
        images=torch.stack([t for _, _, t in good]),
        labels=np.array([remap[label] for label, _, _ in good], dtype=np.int64),
        names=[names[i] for i in used_labels],
        paths=[rel for _, rel, _ in good],
        root=str(root),
    )


def load_recordio(path: str | os.PathLike, pre: Preprocess, stream: bool = False,
                  progress: bool = True) -> IdentityDataset:
    """A RecordIO training set (data/recordio.py): decoded into memory, or ``stream``ed from the .rec (decoded a
    batch at a time). Malformed records are skipped with one warning naming their offsets."""
    records = RecordFile(path)
    listing = records.scan(progress)
    labels, names = identity_names(listing.labels)
    paths = [str(i) for i in listing.indices]  # a record is known by its .idx index
    what = "malformed or undecodable record(s)"
    if stream:
        warn_skipped(listing.skipped, what)
        if not len(labels):
            raise SiamkitError(f"no readable records in {path}; check it is an image RecordIO file")
        return IdentityDataset(RecordRows(records.reader, listing.offsets, pre), labels, names, paths, str(path))
    _check_memory(len(labels), pre)
    with progress_bar(total=len(labels), desc="decode", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        decoded = decode_records(records.reader, listing.offsets, pre, bar)
    decoded = [out if isinstance(out, str) else (torch.from_numpy(out[0]), too_small(out[1])) for out in decoded]
    bad = listing.skipped + [(records.where(int(i), int(o)), out) for i, o, out in
                             zip(listing.indices, listing.offsets, decoded) if isinstance(out, str)]
    return _assemble(Path(path), names, list(zip(labels.tolist(), paths)), decoded, bad, what)


def load_binset(path: str | os.PathLike, pre: Preprocess) -> IdentityDataset:
    """A .bin validation set (data/binsets.py): its 2N images decoded, its N pairs in file order, 10 contiguous folds.
    Every image is its own "identity" (a .bin names no one); the pairs say who is who."""
    images, issame = read_binset(path)
    _check_memory(len(images), pre)

    def work(k: int) -> torch.Tensor:
        try:
            return torch.from_numpy(decode_image_array(io.BytesIO(images[k]), pre))
        except ValueError as e:
            raise SiamkitError(f"{path}: image {k} (of pair {k // 2}) is not a decodable image ({e}); a .bin's "
                               f"pairs are its protocol, so none is skipped: pass an undamaged copy") from None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        decoded = list(pool.map(work, range(len(images))))
    n = len(images)
    return IdentityDataset(
        images=torch.stack(decoded), labels=np.arange(n, dtype=np.int64), names=[str(k) for k in range(n)],
        paths=[str(k) for k in range(n)], root=str(path),
        pairs=(np.arange(0, n, 2), np.arange(1, n, 2), issame, contiguous_folds(len(issame))),
    )


def _from_arrays(name: str, images: np.ndarray, labels: np.ndarray, pre: Preprocess, names=None) -> IdentityDataset:
    """Float images in [0, 1] ([N, H, W] or [N, H, W, 3]) -> IdentityDataset through the usual preprocessing."""
    _check_memory(len(images), pre)
    arr = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    tensors = [image_to_uint8(Image.fromarray(a), pre) for a in arr]
    labels = np.asarray(labels, dtype=np.int64)
    uniq = np.unique(labels)
    remap = np.searchsorted(uniq, labels)
    if names is None:
        names = [str(u) for u in uniq]
    else:
        names = [str(names[u]) for u in uniq]
    return IdentityDataset(
        images=torch.stack(tensors),
        labels=remap.astype(np.int64),
        names=names,
        paths=[f"{name}/{names[remap[i]]}/{i}" for i in range(len(labels))],
        root=name,
    )


def _load_digits(pre: Preprocess) -> IdentityDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: works offline
    return _from_arrays("digits", digits.images / 16.0, digits.target, pre)


def _no_retries(fetch) -> dict:
    """Fail fast offline: scikit-learn >= 1.5 retries downloads 3 times, a second apart, by default."""
    import inspect

    params = inspect.signature(fetch).parameters
    return {k: v for k, v in (("n_retries", 1), ("delay", 0.1)) if k in params}


def _fetch_failed(what: str, error: Exception, hint: str) -> SiamkitError:
    return SiamkitError(f"could not get {what} through scikit-learn ({type(error).__name__}: {error}); {hint}")


def _load_olivetti(pre: Preprocess, data_home: str | None) -> IdentityDataset:
    from sklearn.datasets import fetch_olivetti_faces

    try:
        faces = fetch_olivetti_faces(data_home=data_home, download_if_missing=True, **_no_retries(fetch_olivetti_faces))
    except Exception as e:  # offline, proxy, corrupt cache: all end the same way for the user
        raise _fetch_failed(
            "the Olivetti faces",
            e,
            "connect to the internet once so scikit-learn can cache them (see sklearn.datasets.get_data_home()), "
            "or pass a folder of identity sub-folders with --data (the AT&T faces are the same 400 images)",
        ) from None
    return _from_arrays("olivetti", faces.images, faces.target, pre)


def _load_lfw(pre: Preprocess, data_home: str | None) -> IdentityDataset:
    from sklearn.datasets import fetch_lfw_people

    try:
        # The full 250x250 images (slice_=None); --center-crop picks the face region.
        lfw = fetch_lfw_people(
            data_home=data_home, min_faces_per_person=2, color=pre.channels == 3, resize=1.0, slice_=None,
            download_if_missing=True, **_no_retries(fetch_lfw_people),
        )
    except Exception as e:
        raise _fetch_failed(
            "LFW",
            e,
            "connect to the internet once so scikit-learn can cache it (about 200 MB), "
            "or pass the extracted lfw folder (one sub-folder per person) with --data",
        ) from None
    images = lfw.images / 255.0 if lfw.images.max() > 1.0 else lfw.images
    return _from_arrays("lfw", images, lfw.target, pre, names=list(lfw.target_names))


# The AT&T faces, shipped inside the package (credit: data/ATT_FACES_CREDIT.txt; scripts/pack_att_faces.py).
ATT_FACES_PNG = Path(__file__).with_name("att_faces.png")
ATT_SHAPE = (40, 10, 112, 92)  # identities, images per identity, height, width


def load_att_faces(pre: Preprocess, identities: range = range(40), root: str = "att") -> IdentityDataset:
    """The built-in AT&T faces of people s<i+1> for i in ``identities``, paths as in the original folders."""
    n_ids, per_id, h, w = ATT_SHAPE
    with Image.open(ATT_FACES_PNG, formats=["PNG"]) as img:
        grid = np.asarray(img)
    if grid.shape != (n_ids * h, per_id * w):
        raise SiamkitError(f"{ATT_FACES_PNG} is damaged ({grid.shape}); reinstall siamkit")
    cells = [(i, k) for i in identities for k in range(per_id)]
    _check_memory(len(cells), pre)
    return IdentityDataset(
        images=torch.stack([image_to_uint8(Image.fromarray(grid[i * h:(i + 1) * h, k * w:(k + 1) * w]), pre)
                            for i, k in cells]),
        labels=np.repeat(np.arange(len(identities)), per_id),
        names=[f"s{i + 1}" for i in identities],
        paths=[f"s{i + 1}/{k + 1}.pgm" for i, k in cells],
        root=root,
    )


FOLDER = Source(lambda path, pre, data_home: load_folder(path, pre))
# A RecordIO training set: decoded into memory here; data/cache.py decodes it into the decoded cache or streams it.
register_file_source(".rec", Source(lambda path, pre, data_home: load_recordio(path, pre)))
register_file_source(".bin", Source(lambda path, pre, data_home: load_binset(path, pre), validation_only=True))
# Mirrored digits are other symbols: no augmentation by default.
register_source("digits", Source(lambda _, pre, data_home: _load_digits(pre), image_size=(32, 32), augment="none",
                                 recipe="none"))
register_source("olivetti", Source(lambda _, pre, data_home: _load_olivetti(pre, data_home), native_size=(64, 64)))
# LFW's 250x250 frames hold much more than the face: keep the central half by default.
register_source("lfw", Source(lambda _, pre, data_home: _load_lfw(pre, data_home), center_crop=0.5,
                              native_size=(250, 250)))
# The built-in faces: all 40 people, or the split the README's accuracy numbers use (train s1-s30, test s31-s40).
for _name, _ids in (("att", range(40)), ("att-train", range(30)), ("att-test", range(30, 40))):
    register_source(_name, Source(lambda _, pre, data_home, ids=_ids, name=_name: load_att_faces(pre, ids, name),
                                  image_size=(64, 64), grayscale=True, native_size=ATT_SHAPE[2:]))


def split_identities(
    ds: IdentityDataset, val_identities: float, seed: int
) -> tuple[IdentityDataset, IdentityDataset | None]:
    """Hold out whole identities (a fraction < 1 or a count >= 1), chosen with ``seed``."""
    n = ds.n_identities
    if val_identities <= 0:
        return ds, None
    n_val = int(val_identities) if val_identities >= 1 else max(1, round(val_identities * n))
    if n - n_val < 2 or n_val < 2:
        raise SiamkitError(
            f"--val-identities {val_identities:g} holds out {n_val} of {n} identities; training and validation "
            f"each need at least 2 (pass a smaller value, or 0 to skip validation)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return ds.subset(order[n_val:]), ds.subset(order[:n_val])


def require_trainable(ds: IdentityDataset, what: str = "training data") -> None:
    """At least two identities, and at least one with two images (a genuine pair)."""
    counts = np.bincount(ds.labels, minlength=ds.n_identities)
    if ds.n_identities < 2:
        raise SiamkitError(f"{what} has {ds.n_identities} identity; verification needs at least 2 identities")
    singles = int((counts < 2).sum())
    if singles == ds.n_identities:
        raise SiamkitError(f"every identity in {what} has a single image; genuine pairs need identities with 2+ images")
    if singles:
        warn(f"{singles} identities in {what} have a single image: used only as impostors")
