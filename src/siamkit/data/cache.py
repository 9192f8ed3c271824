"""The decoded cache: a folder's images decoded once into a file of fixed-size uint8 images, memory-mapped after.

A cache is a folder ``<cache dir>/<key>/`` holding ``images.u8`` (N x C x H x W uint8, row after row) and
``index.json`` (paths, labels, identity names, shape and the key). The key is a hash of every source file's
relative path, size and modification time and of the preprocessing, so a changed folder or preprocessing gets a
new cache and the next run on the same data finds the old one. A cache is built under a temporary name and
renamed into place when complete, under a lock file, so two processes building the same cache never read half
of one: one builds, the others wait and then read it. A cache that does not check out (a truncated or damaged
images file: the index holds its sha256, checked at every open; an index of another key or format) is rebuilt,
never trusted. After a build, the oldest caches beyond the size
cap are removed (a run still using one keeps reading it: its files are unlinked, not overwritten).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import SiamkitError, info, warn
from ..fileio import Busy, atomic_write_json, file_lock, file_sha256, write_error
from ..progress import progress_bar
from .limits import check_fits_disk, disk_shortfall
from .pixels import DECODING_VERSION
from .pixels import too_small, warn_small
from .recordio import RecordFile, identity_names
from .rows import LazyRows
from .sources import (FILE_SOURCES, FOLDER, IdentityDataset, decode_image, list_folder, load_recordio, load_source,
                      source_of, warn_skipped)
from .transforms import Preprocess

FORMAT = "siamkit-decoded-cache"
VERSION = 2  # 2: index.json holds the sha256 of images.u8, checked at every open
IMAGES_FILE, INDEX_FILE = "images.u8", "index.json"
DEFAULT_MAX_GB = 50.0
# Decoding in worker processes pays off from this many images (each worker imports torch first).
PROCESS_DECODE_FROM = 2000
CHUNK = 256  # images per worker task: progress moves often, and each task amortises its memmap open


def default_cache_dir() -> Path:
    """$SIAMKIT_CACHE_DIR, else $XDG_CACHE_HOME/siamkit, else ~/.cache/siamkit."""
    if os.environ.get("SIAMKIT_CACHE_DIR"):
        return Path(os.environ["SIAMKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siamkit"


class ImageRows(LazyRows):
    """uint8 images [N, C, H, W] that live in a memory-mapped file (data/rows.py): indexing gives a lazy view,
    reading copies."""

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None):
        super().__init__(len(array), array.shape[1:], rows)
        self.array = array

    def view(self, rows: np.ndarray) -> "ImageRows":
        return ImageRows(self.array, rows)

    def read_into(self, out: np.ndarray) -> None:
        np.take(self.array, self.rows, axis=0, out=out)


@dataclass
class Listing:
    """What a decoded cache is built from: the identity names, and per image its label (an index into ``names``), its
    path (kept in the index) and the item ``read`` turns into something Pillow opens (a file path, a file object)."""

    root: str
    names: list[str]
    labels: list[int]
    paths: list[str]
    items: list
    read: Callable[[Any], Any] | None = None  # picklable (worker processes call it); None: the items are file paths
    where: Callable[[int], str] | None = None  # how warnings name image i; None: its item
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (which, why) found unusable before decoding
    what: str = "unreadable image(s)"  # what the warning calls the skipped ones


def folder_listing(root: Path, names: list[str], files: list[list[str]]) -> Listing:
    flat = [(label, path) for label, paths in enumerate(files) for path in paths]
    return Listing(str(root), names, [label for label, _ in flat], [path for _, path in flat],
                   [os.path.join(root, path) for _, path in flat])


def record_listing(records: RecordFile, progress: bool) -> Listing:
    """A .rec's image records (their headers scanned first) as a listing: read by offset in every worker."""
    scanned = records.scan(progress)
    labels, names = identity_names(scanned.labels)
    return Listing(str(records.path), names, labels.tolist(), [str(i) for i in scanned.indices],
                   scanned.offsets.tolist(), read=records.reader,
                   where=lambda i: records.where(int(scanned.indices[i]), int(scanned.offsets[i])),
                   skipped=scanned.skipped, what="malformed or undecodable record(s)")


def fingerprint(names: Sequence[str], files: Sequence[Sequence[str]], root: Path, pre: Preprocess) -> str:
    """Hash of the format, the decoding (pixels.DECODING_VERSION), the preprocessing and every file's relative path,
    size and mtime (not the root)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "version": VERSION, "preprocess": pre.to_dict(),
                                   "decoding": DECODING_VERSION}).encode())
    prefix = f"{root}{os.sep}"  # string concatenation: os.path.join costs more than the stat at 100,000 files
    for paths in files:
        for rel in paths:
            try:
                st = os.stat(prefix + rel)
                line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError:  # unreadable now: decoding skips it; its absence is part of the fingerprint
                line = f"{rel}\0missing\n"
            # surrogateescape: a name that is not valid UTF-8 (any bytes are a valid file name) hashes as its bytes
            h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def load_cached_folder(
    root: str | os.PathLike, pre: Preprocess, cache_dir: str | os.PathLike | None = None,
    max_gb: float = DEFAULT_MAX_GB, progress: bool = True,
) -> IdentityDataset:
    """A folder's images from its decoded cache, built first if there is none (or none that checks out)."""
    root = Path(root)
    names, files = list_folder(root)
    key = fingerprint(names, files, root, pre)
    return _load_cached(key, str(root), sum(map(len, files)), pre, _base(cache_dir), max_gb, progress,
                        lambda: folder_listing(root, names, files))


def load_cached_recordio(
    path: str | os.PathLike, pre: Preprocess, cache_dir: str | os.PathLike | None = None,
    max_gb: float = DEFAULT_MAX_GB, progress: bool = True,
) -> IdentityDataset:
    """A RecordIO training set from its decoded cache (keyed by the .rec's and .idx's size and modification time),
    built first if there is none; streamed from the .rec instead where the disk could not hold the decoded images."""
    records = RecordFile(path)  # checked first: a file that is not (all) RecordIO is one line, nothing written
    key = fingerprint([], [[records.path.name, records.idx_path.name]], records.path.parent, pre)
    base = _base(cache_dir)
    n = len(records.image_indices())
    short = None if (base / key / INDEX_FILE).is_file() else disk_shortfall(n, pre.channels, pre.image_size, base)
    if short is not None:
        info(f"{path}: {short}: streamed from the .rec, each step's images decoded as they are read (--cache-dir "
             f"picks a larger disk)")
        return load_recordio(path, pre, stream=True, progress=progress)
    return _load_cached(key, str(path), n, pre, base, max_gb, progress, lambda: record_listing(records, progress))


def _base(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _load_cached(key: str, root: str, n_images: int, pre: Preprocess, base: Path, max_gb: float, progress: bool,
                 listing: Callable[[], Listing]) -> IdentityDataset:
    """The decoded cache ``key`` in ``base``, built from ``listing()`` first if there is none that checks out."""
    final = base / key
    found = _open(final, key)
    if isinstance(found, str):
        # Before the cache folder or a file in it exists: what the disk cannot hold leaves nothing behind.
        check_fits_disk(n_images, pre.channels, pre.image_size, base)
        _make_dir(base)
        with file_lock(base / f"{key}.lock", f"the decoded cache {final}", timeout=None):
            found = _open(final, key)  # another process may have built it while this one waited
            if isinstance(found, str):
                if final.exists():
                    warn(f"decoded cache {final} is unusable ({found}); rebuilding it")
                    _remove(final)
                _build(final, listing(), pre, progress)
                found = _open(final, key)
                if isinstance(found, str):
                    raise SiamkitError(f"decoded cache {final} could not be read back after building ({found})")
                evict(base, max_gb, keep=key)
    array, index = found
    warn_small(root, [tuple(item) for item in index.get("small", [])])  # at every use: evaluate and embed say it too
    _touch(final / INDEX_FILE)  # last use: the size cap removes the least recently used caches first
    return IdentityDataset(
        images=ImageRows(array), labels=np.asarray(index["labels"], dtype=np.int64), names=list(index["names"]),
        paths=list(index["paths"]), root=root,
    )


def load_data(
    source: str, pre: Preprocess, cache_dir: str | None = None, max_gb: float = DEFAULT_MAX_GB,
    data_home: str | None = None, progress: bool = True,
) -> IdentityDataset:
    """``--data``: a folder or a .rec through its decoded cache (``cache_dir`` "none": decoded into memory), a built-in
    or a .bin in memory."""
    entry = source_of(source)
    if cache_dir is not None and str(cache_dir).lower() == "none":
        return load_source(source, pre, data_home)
    if entry is FOLDER:
        return load_cached_folder(source, pre, cache_dir, max_gb, progress)
    if entry is FILE_SOURCES.get(".rec"):
        return load_cached_recordio(source, pre, cache_dir, max_gb, progress)
    return load_source(source, pre, data_home)


def _open(folder: Path, key: str) -> tuple[np.ndarray, dict] | str:
    """(memory-mapped images, index) of a complete cache, or why it is unusable."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except FileNotFoundError:
        return "no index"
    except (OSError, ValueError) as e:
        return f"index unreadable: {e}"
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        return "not a siamkit cache of this version"
    if index.get("key") != key:
        return f"index is of another cache ({index.get('key')!r})"
    try:
        shape = tuple(int(s) for s in index["shape"])
        n = shape[0]
        if len(shape) != 4 or len(index["labels"]) != n or len(index["paths"]) != n or min(shape) < 1:
            return "index is inconsistent"
    except (KeyError, TypeError, ValueError):
        return "index is incomplete"
    images = folder / IMAGES_FILE
    expected = int(np.prod(shape))
    try:
        size = images.stat().st_size
    except OSError:
        return "images file missing"
    if size != expected:
        return f"images file holds {size} bytes, the index says {expected} (truncated or overwritten)"
    if file_sha256(images) != index.get("sha256"):
        return "images file damaged (its sha256 differs from the one stored in the index)"
    # Copy-on-write: the tensors built on it are writable (PyTorch warns about read-only arrays), the file never is.
    return np.memmap(images, dtype=np.uint8, mode="c", shape=shape), index


def _build(final: Path, listing: Listing, pre: Preprocess, progress: bool) -> None:
    """Decode every image of ``listing`` into a temporary folder beside ``final``, then rename it into place."""
    for stale in final.parent.glob(f".{final.name}.build-*"):  # left by a killed builder (we hold the lock)
        _remove(stale)
    tmp = final.parent / f".{final.name}.build-{os.getpid()}"
    n = len(listing.items)
    row_shape = (pre.channels, *pre.image_size)
    row_bytes = int(np.prod(row_shape))
    start = time.perf_counter()
    try:
        tmp.mkdir()
        images_path = tmp / IMAGES_FILE
        with open(images_path, "wb") as f:
            f.truncate(n * row_bytes)
        errors, small = _decode_all(images_path, (n, *row_shape), listing, pre, progress)
        good = [i for i in range(n) if i not in errors]
        where = listing.where or (lambda i: str(listing.items[i]))
        warn_skipped(listing.skipped + [(where(i), why) for i, why in sorted(errors.items())], listing.what)
        if not good:
            raise SiamkitError(f"no readable images in {listing.root}; check the files are images Pillow can open")
        _compact(images_path, good, n, row_bytes)
        used_labels = sorted({listing.labels[i] for i in good})
        remap = {old: new for new, old in enumerate(used_labels)}
        index = {
            "format": FORMAT, "version": VERSION, "key": final.name, "shape": [len(good), *row_shape],
            "preprocess": pre.to_dict(), "source": listing.root, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "names": [listing.names[i] for i in used_labels], "labels": [remap[listing.labels[i]] for i in good],
            "paths": [listing.paths[i] for i in good],
            # images under MIN_IMAGE_SIDE, kept
            "small": [[listing.paths[i], why] for i, why in sorted(small.items())],
        }
        with open(images_path, "rb+") as f:
            os.fsync(f.fileno())
        index["sha256"] = file_sha256(images_path)  # checked at every open: a damaged cache is rebuilt
        atomic_write_json(tmp / INDEX_FILE, index)
        os.rename(tmp, final)
    except OSError as e:
        _remove(tmp)
        raise write_error(final, e, "the decoded cache needs about the decoded size of the data set on disk "
                                    "(--cache-dir picks another folder)") from e
    except BaseException:
        _remove(tmp)
        raise
    gib = len(good) * row_bytes / 2**30
    info(f"decoded {len(good)} images into the cache {final} ({gib:.2f} GiB) in {time.perf_counter() - start:.1f} s")


def _decode_all(images_path: Path, shape: tuple, listing: Listing, pre: Preprocess,
                progress: bool) -> tuple[dict[int, str], dict[int, str]]:
    """Decode the listing's images into the rows of ``images_path``: worker processes on every core; -> ({row: why
    unreadable}, {row: why too small})."""
    items = listing.items
    chunks = [(str(images_path), shape, pre.to_dict(), start, items[start:start + CHUNK], listing.read)
              for start in range(0, len(items), CHUNK)]
    workers = os.cpu_count() or 1
    errors: dict[int, str] = {}
    small: dict[int, str] = {}
    bar = progress_bar(total=len(items), desc="decode", unit="img", disable=not progress, dynamic_ncols=True)
    if len(items) >= PROCESS_DECODE_FROM and workers > 1:
        # fork, as PyTorch's DataLoader workers do (one intra-op thread each, so no thread pool is inherited
        # half-made): spawn would import the user's __main__ again in every worker, and fails for `python -`.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method), initializer=_one_thread)
    else:  # Pillow releases the GIL while decoding: threads decode in parallel without the start-up cost.
        pool = ThreadPoolExecutor(max_workers=min(8, workers * 2))
    with pool, bar:
        for done, bad, tiny in pool.map(_decode_chunk, chunks):
            errors.update(bad)
            small.update(tiny)
            bar.update(done)
    return errors, small


def _one_thread() -> None:
    torch.set_num_threads(1)


def _decode_chunk(task: tuple) -> tuple[int, dict[int, str], dict[int, str]]:
    """Worker: decode one chunk of items into its rows of the images file; -> (count, {row: why unreadable},
    {row: why too small})."""
    images_path, shape, pre_dict, start, items, read = task
    pre = Preprocess.from_dict(pre_dict)
    out = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    bad: dict[int, str] = {}
    small: dict[int, str] = {}
    for offset, item in enumerate(items):
        sizes: list = []
        try:
            # read: a RecordReader gives a record's image (ValueError when the record is malformed)
            out[start + offset] = decode_image(item if read is None else read(item), pre, sizes).numpy()
        except ValueError as e:
            bad[start + offset] = str(e)
            continue
        if too_small(sizes[0]):
            small[start + offset] = too_small(sizes[0])
    out.flush()
    del out
    return len(items), bad, small


def _compact(images_path: Path, good: list[int], n: int, row_bytes: int) -> None:
    """Move the decoded rows over the skipped ones, in order, and cut the file to the rows kept."""
    if len(good) == n:
        return
    with open(images_path, "rb+") as f:
        for new, old in enumerate(good):
            if new != old:
                f.seek(old * row_bytes)
                row = f.read(row_bytes)
                f.seek(new * row_bytes)
                f.write(row)
        f.truncate(len(good) * row_bytes)


def evict(base: Path, max_gb: float, keep: str) -> None:
    """Remove the least recently used caches until the folder holds at most ``max_gb`` (never ``keep``)."""
    caches = []
    for folder in _complete_caches(base):
        try:
            caches.append(((folder / INDEX_FILE).stat().st_mtime, _size(folder), folder))
        except OSError:
            continue
    total = sum(size for _, size, _ in caches)
    for _, size, folder in sorted(caches):
        if total <= max_gb * 2**30:
            return
        if folder.name == keep:
            continue
        try:
            # Not while another process rebuilds it; never wait for one (two evicting builders would deadlock).
            with file_lock(base / f"{folder.name}.lock", f"the decoded cache {folder}", timeout=0):
                _remove(folder)
        except Busy:
            continue
        total -= size
        info(f"removed the decoded cache {folder} ({size / 2**30:.2f} GiB, least recently used; --cache-max-gb {max_gb:g})")
    if total > max_gb * 2**30:
        warn(f"the decoded cache {base / keep} alone is larger than --cache-max-gb {max_gb:g}; it is kept for this run")


def _complete_caches(base: Path) -> Iterator[Path]:
    for folder in base.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and (folder / INDEX_FILE).is_file():
            yield folder


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _make_dir(base: Path) -> None:
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(base / INDEX_FILE, e, "--cache-dir picks another folder for the decoded cache") from e


def _remove(path: Path) -> None:
    """Rename away first, then delete: a reader never sees a half-deleted cache under its own name."""
    if not path.exists():
        return
    doomed = path.parent / f".{path.name}.removing-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache folder still serves reads
        pass
