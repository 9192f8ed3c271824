"""The decoded cache against the in-memory decoder (load_folder): same images, labels and paths; rebuilt when
the source or the preprocessing changes or the cache is damaged; two processes building it at once."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from siamkit.data import cache
from siamkit.data.cache import ImageRows, load_cached_folder, load_data
from siamkit.data.sources import load_folder
from siamkit.data.transforms import Preprocess
from siamkit.fileio import file_lock

REPO = Path(__file__).resolve().parents[2]
PRE = Preprocess(image_size=(24, 20), channels=1, mean=(0.5,), std=(0.5,))


@pytest.fixture
def faces(att_faces, tmp_path) -> Path:
    """4 AT&T identities x 5 images, copied (tests touch and break them), and one unreadable file."""
    root = tmp_path / "faces"
    for i in range(1, 5):
        (root / f"s{i}").mkdir(parents=True)
        for k in range(1, 6):
            shutil.copy2(att_faces / f"s{i}" / f"{k}.pgm", root / f"s{i}" / f"{k}.pgm")
    (root / "s2" / "9.pgm").write_bytes(b"not an image")
    return root


def _same_as_memory(ds, root: Path, pre: Preprocess = PRE) -> None:
    ref = load_folder(root, pre)
    assert isinstance(ds.images, ImageRows)
    assert torch.equal(ds.images.read(), ref.images)
    assert np.array_equal(ds.labels, ref.labels) and ds.names == ref.names and ds.paths == ref.paths


def _caches(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_cache_holds_what_the_decoder_gives_and_is_read_back_not_rebuilt(faces, tmp_path, capfd):
    base = tmp_path / "cache"
    ds = load_cached_folder(faces, PRE, base, progress=False)
    err = capfd.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "decoded 20 images into the cache" in err
    _same_as_memory(ds, faces)
    (folder,) = _caches(base)
    assert (folder / "images.u8").stat().st_size == 20 * 24 * 20
    again = load_cached_folder(faces, PRE, base, progress=False)
    assert "decoded" not in capfd.readouterr().err  # found, not rebuilt
    assert isinstance(again.images.array, np.memmap)
    _same_as_memory(again, faces)
    assert _caches(base) == [folder]


def test_subsets_are_views_and_read_the_rows_they_name(faces, tmp_path):
    ds = load_cached_folder(faces, PRE, tmp_path / "cache", progress=False)
    ref = load_folder(faces, PRE)
    sub, ref_sub = ds.subset(np.array([3, 1])), ref.subset(np.array([3, 1]))
    assert isinstance(sub.images, ImageRows) and sub.images.array is ds.images.array  # nothing copied
    assert torch.equal(sub.images.read(), ref_sub.images)
    idx = torch.tensor([7, 0, 7, 3])
    assert torch.equal(sub.images[idx].to(torch.float32), ref_sub.images[idx].float())
    assert torch.equal(sub.images[2:5].read(), ref_sub.images[2:5])
    assert sub.images.shape == ref_sub.images.shape and len(sub.images) == len(ref_sub.images)


def test_a_touched_file_or_other_preprocessing_builds_a_new_cache(faces, tmp_path):
    base = tmp_path / "cache"
    load_cached_folder(faces, PRE, base, progress=False)
    first = _caches(base)
    # Same bytes, new modification time: the fingerprint (path, size, mtime) changes.
    st = (faces / "s1" / "1.pgm").stat()
    os.utime(faces / "s1" / "1.pgm", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_cached_folder(faces, PRE, base, progress=False)
    second = _caches(base)
    assert len(second) == 2 and set(first) < set(second)
    # Another image size: another cache, holding that preprocessing's images.
    other = Preprocess(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    ds = load_cached_folder(faces, other, base, progress=False)
    assert len(_caches(base)) == 3
    _same_as_memory(ds, faces, other)
    # A new image in the folder is part of the data: yet another cache, with 21 images.
    shutil.copy2(faces / "s1" / "1.pgm", faces / "s1" / "6.pgm")
    assert len(load_cached_folder(faces, PRE, base, progress=False)) == 21
    assert len(_caches(base)) == 4


@pytest.mark.parametrize("damage", ["truncate", "flipped-bytes", "foreign-index", "garbled-index", "no-images"])
def test_a_damaged_cache_is_rebuilt_never_trusted(faces, tmp_path, capfd, damage):
    base = tmp_path / "cache"
    load_cached_folder(faces, PRE, base, progress=False)
    (folder,) = _caches(base)
    images, index = folder / "images.u8", folder / "index.json"
    if damage == "truncate":
        with open(images, "rb+") as f:
            f.truncate(images.stat().st_size - 100)
    elif damage == "flipped-bytes":  # the same size: only the stored sha256 tells
        with open(images, "rb+") as f:
            f.seek(1000)
            block = f.read(64)
            f.seek(1000)
            f.write(bytes(b ^ 0xFF for b in block))
    elif damage == "foreign-index":
        data = json.loads(index.read_text())
        index.write_text(json.dumps({**data, "key": "0" * 32}))
    elif damage == "garbled-index":
        index.write_text('{"format": "siamkit-decoded-cache", "vers')
    else:
        images.unlink()
    capfd.readouterr()
    ds = load_cached_folder(faces, PRE, base, progress=False)
    err = capfd.readouterr().err
    assert f"decoded cache {folder} is unusable" in err and "rebuilding it" in err
    assert "decoded 20 images into the cache" in err
    _same_as_memory(ds, faces)
    assert _caches(base) == [folder]


def test_the_size_cap_removes_the_least_recently_used_cache_first(faces, tmp_path, capfd):
    base = tmp_path / "cache"
    sizes = [(24, 20), (16, 16), (20, 20)]
    pres = [Preprocess(image_size=s, channels=1, mean=(0.5,), std=(0.5,)) for s in sizes]
    for pre in pres[:2]:
        load_cached_folder(faces, pre, base, progress=False)
    a, b = (cache.fingerprint(*_listing(faces), faces, pre) for pre in pres[:2])
    os.utime(base / b / "index.json", (time.time() - 100, time.time() - 100))  # b used longer ago than a
    # Room for the new cache and one more: b, the least recently used, goes.
    one = (base / a / "images.u8").stat().st_size + (base / a / "index.json").stat().st_size
    new = 20 * 20 * 20 + (base / a / "index.json").stat().st_size + 200
    load_cached_folder(faces, pres[2], base, max_gb=(one + new) / 2**30, progress=False)
    names = {p.name for p in _caches(base)}
    assert a in names and b not in names and len(names) == 2
    assert f"removed the decoded cache {base / b}" in capfd.readouterr().err
    # A cap below the newest cache alone keeps it (this run uses it) and says so.
    load_cached_folder(faces, pres[1], base, max_gb=1e-9, progress=False)
    assert len(_caches(base)) == 1
    assert "alone is larger than --cache-max-gb" in capfd.readouterr().err


def _listing(root: Path):
    from siamkit.data.sources import list_folder

    return list_folder(root)


def test_load_data_caches_folders_only_and_none_decodes_into_memory(faces, tmp_path):
    base = tmp_path / "cache"
    assert isinstance(load_data(str(faces), PRE, str(base), progress=False).images, ImageRows)
    assert isinstance(load_data(str(faces), PRE, "none").images, torch.Tensor)
    assert isinstance(load_data("att-test", PRE, str(base)).images, torch.Tensor)  # built-in: in memory
    assert len(_caches(base)) == 1


def test_an_unwritable_cache_folder_is_one_clear_error(faces, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cache.SiamkitError, match=f"could not write {blocker}/.*is a file, not a folder.*--cache-dir"):
        load_cached_folder(faces, PRE, blocker / "cache", progress=False)


_CHILD = """
import sys, hashlib
from siamkit.data.cache import load_cached_folder
from siamkit.data.transforms import Preprocess
ds = load_cached_folder(sys.argv[1], Preprocess((24, 20), 1.0, 1, (0.5,), (0.5,)), sys.argv[2], progress=False)
print(hashlib.sha256(ds.images.read().numpy().tobytes()).hexdigest(), len(ds))
"""


def test_two_processes_building_one_cache_one_builds_the_other_waits_then_reads(faces, tmp_path):
    base = tmp_path / "cache"
    base.mkdir()
    key = cache.fingerprint(*_listing(faces), faces, PRE)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    # Hold the build lock here, so that both processes find no cache and queue for the lock at the same time
    # (each says so on stderr before it blocks).
    with file_lock(base / f"{key}.lock", "the cache", timeout=None):
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(faces), str(base)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=open(log, "w")) for log in logs]
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, "the processes never reached the lock"
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.1)
        time.sleep(0.5)
        assert not (base / key).exists() and all(p.poll() is None for p in procs)  # both still blocked
    outs = [p.communicate(timeout=120)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("decoded 20 images into the cache" in e for e in errs) == 1, errs  # one built, the other read it
    ref = hashlib.sha256(load_folder(faces, PRE).images.numpy().tobytes()).hexdigest()
    assert [out.split() for out in outs] == [[ref, "20"]] * 2
    assert not list(base.glob(".*build*"))  # no temporary folder left


def test_worker_processes_decode_the_same_images(faces, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "PROCESS_DECODE_FROM", 1)  # the process pool for 21 files, as for 2,000+
    monkeypatch.setattr(cache, "CHUNK", 4)  # several tasks per worker, the last one shorter
    monkeypatch.setattr(cache.os, "cpu_count", lambda: 2)
    ds = load_cached_folder(faces, PRE, tmp_path / "cache", progress=False)
    _same_as_memory(ds, faces)


def test_the_size_cap_skips_a_cache_another_process_is_rebuilding(faces, tmp_path):
    base = tmp_path / "cache"
    small = Preprocess(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    load_cached_folder(faces, small, base, progress=False)
    (other,) = _caches(base)
    os.utime(other / "index.json", (time.time() - 100, time.time() - 100))
    with file_lock(base / f"{other.name}.lock", "the cache", timeout=None):  # as if another process were rebuilding it
        load_cached_folder(faces, PRE, base, max_gb=1e-9, progress=False)  # does not wait for it
    assert other in _caches(base) and len(_caches(base)) == 2


# --- issue 28: any file-name bytes, orientation in the key, the disk's free space -----------------------------------

def test_folder_names_that_are_not_utf8_cache_like_any_other(att_faces, tmp_path):
    # Any bytes but / and NUL make a valid name on Linux; Python reads the others as surrogates (os.fsdecode).
    root = tmp_path / "faces"
    root.mkdir()
    raw_names = [b"\xff\xfe", b"caf\xe9", b"s3"]
    for i, raw in enumerate(raw_names, start=1):
        folder = os.path.join(bytes(root), raw)
        os.mkdir(folder)
        for k in (1, 2):
            shutil.copy2(att_faces / f"s{i}" / f"{k}.pgm", os.path.join(folder, f"{k}.pgm".encode()))
    ds = load_cached_folder(root, PRE, tmp_path / "cache", progress=False)
    assert ds.names == sorted(os.fsdecode(raw) for raw in raw_names)
    _same_as_memory(ds, root)
    again = load_cached_folder(root, PRE, tmp_path / "cache", progress=False)  # its index read back, names intact
    assert again.names == ds.names and again.paths == ds.paths


def test_the_key_covers_the_decoding_so_caches_of_sideways_pixels_are_not_reused(faces, monkeypatch):
    from siamkit.data import pixels

    key = cache.fingerprint(*_listing(faces), faces, PRE)
    # The decoders before EXIF orientation was applied: other pixels for tagged photos, so another key.
    monkeypatch.setattr(cache, "DECODING_VERSION", pixels.DECODING_VERSION - 1)
    assert cache.fingerprint(*_listing(faces), faces, PRE) != key


def test_a_cache_the_disk_cannot_hold_is_refused_before_anything_is_written(faces, tmp_path, monkeypatch):
    from collections import namedtuple

    from siamkit.data import limits
    from siamkit.errors import SiamkitError

    usage = namedtuple("usage", "total used free")
    need = 21 * 24 * 20  # the 21 candidate files at 1 x 24 x 20 bytes each, counted before decoding
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - need + 1, need - 1))
    base = tmp_path / "cache"
    with pytest.raises(SiamkitError, match=f"21 images at 1x24x20 decode to 0.0 GiB for the decoded cache, but the "
                                           f"disk holding {base} has 0.0 GiB free; pass a smaller --image-size"):
        load_cached_folder(faces, PRE, base, progress=False)
    assert not base.exists()  # no folder, no lock, no sparse images file
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - need, need))
    assert len(load_cached_folder(faces, PRE, base, progress=False)) == 20  # exactly enough is enough
