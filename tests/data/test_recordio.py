"""RecordIO training sets (data/recordio.py) against a writer of the format written here from its definition
(dmlc-core's RecordIOWriter::WriteRecord, MXNet's pack_img): the same images, labels and training run as a folder
of the same JPEGs; a truncated or foreign file is one error line, a damaged record one warning."""
from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamkit.data.cache import ImageRows, load_data
from siamkit.data.record_images import RecordRows
from siamkit.data.sources import load_folder, load_recordio
from siamkit.data.transforms import Preprocess
from siamkit.errors import SiamkitError
from tiny_run import one_torch_thread, tiny_config  # noqa: F401 (fixture)

MAGIC = 0xCED7230A
PRE = Preprocess(image_size=(28, 24), channels=1, mean=(0.5,), std=(0.5,))
N_IDS, PER_ID = 12, 10


def part_flags(n_parts: int) -> list[int]:
    """dmlc's continuation flags: 0 whole; else 1 first, 2 middle, 3 last."""
    return [0] if n_parts == 1 else [1] + [2] * (n_parts - 2) + [3]


def write_record(f, payload: bytes) -> int:
    """One record as dmlc's writer lays it out: split (the magic left out) wherever the magic sits at a 4-aligned
    offset of the payload; each part: magic, (flag << 29) | length, bytes, zeros to a multiple of 4. -> offset."""
    offset = f.tell()
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
    bounds = [0, *[c for cut in cuts for c in (cut, cut + 4)], len(payload)]
    parts = [payload[bounds[k]:bounds[k + 1]] for k in range(0, len(bounds), 2)]
    for flag, part in zip(part_flags(len(parts)), parts):
        f.write(struct.pack("<II", MAGIC, (flag << 29) | len(part)) + part + b"\0" * (-len(part) % 4))
    return offset


def ir_header(flag: int, label: float, id1: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, id1, id2)


def att_jpegs(att_faces: Path) -> list[list[bytes]]:
    """AT&T people s1..s12, 10 images each, as JPEG bytes."""
    out = []
    for i in range(1, N_IDS + 1):
        row = []
        for k in range(1, PER_ID + 1):
            buf = io.BytesIO()
            Image.open(att_faces / f"s{i}" / f"{k}.pgm").save(buf, format="JPEG", quality=90)
            row.append(buf.getvalue())
        out.append(row)
    return out


def write_rec(path: Path, jpegs: list[list[bytes]]) -> dict[int, int]:
    """insightface's layout: record 0 the header (labels: first identity record, end), the images 1..n, then one
    record per identity (labels: its image range). Image 5 carries the magic in both ids: 3 parts. -> {index: offset}."""
    n_images = sum(map(len, jpegs))
    first_identity = n_images + 1
    offsets = {}
    with open(path, "wb") as f:
        offsets[0] = write_record(f, ir_header(2, 0.0) + struct.pack("<2f", first_identity, first_identity + len(jpegs)))
        index = 1
        for label, images in enumerate(jpegs):
            for image in images:
                ids = (MAGIC, MAGIC) if index == 5 else (index, 0)
                offsets[index] = write_record(f, ir_header(0, float(label), *ids) + image)
                index += 1
        start = 1
        for label, images in enumerate(jpegs):
            offsets[first_identity + label] = write_record(f, ir_header(2, 0.0) + struct.pack("<2f", start, start + len(images)))
            start += len(images)
    path.with_suffix(".idx").write_text("".join(f"{i}\t{o}\n" for i, o in offsets.items()))
    return offsets


def write_folder(root: Path, jpegs: list[list[bytes]]) -> None:
    """The same JPEGs, identities named so they sort like the labels."""
    for label, images in enumerate(jpegs):
        (root / f"{label:02d}").mkdir(parents=True)
        for k, image in enumerate(images):
            (root / f"{label:02d}" / f"{k:02d}.jpg").write_bytes(image)


@pytest.fixture(scope="module")
def sets(att_faces, tmp_path_factory) -> tuple[Path, Path, dict[int, int]]:
    base = tmp_path_factory.mktemp("recordio")
    jpegs = att_jpegs(att_faces)
    offsets = write_rec(base / "train.rec", jpegs)
    write_folder(base / "folder", jpegs)
    return base / "train.rec", base / "folder", offsets


def test_the_writer_split_a_record_into_three_parts(sets):
    rec, _, offsets = sets
    data = rec.read_bytes()
    flags = [struct.unpack_from("<I", data, o + 4)[0] >> 29 for o in (offsets[4], offsets[5], offsets[6])]
    assert flags == [0, 1, 0]  # record 5 starts a split; its neighbours are whole
    after_first = offsets[5] + 8 + 8  # part 1 holds the header's first 8 bytes (flag, label)
    assert struct.unpack_from("<I", data, after_first + 4)[0] >> 29 == 2


def test_records_decode_to_the_folders_images_and_labels(sets):
    rec, folder, _ = sets
    ds, ref = load_recordio(rec, PRE, progress=False), load_folder(folder, PRE)
    assert torch.equal(ds.images, ref.images)  # the same JPEG bytes through the same decoder
    assert np.array_equal(ds.labels, ref.labels) and ds.names == ref.names
    assert ds.paths == [str(i) for i in range(1, N_IDS * PER_ID + 1)]


def test_the_decoded_cache_and_streaming_give_the_same_images(sets, tmp_path, monkeypatch, capfd):
    rec, folder, _ = sets
    ref = load_folder(folder, PRE)
    cached = load_data(str(rec), PRE, str(tmp_path / "cache"), progress=False)
    assert isinstance(cached.images, ImageRows) and torch.equal(cached.images.read(), ref.images)
    assert "decoded 120 images into the cache" in capfd.readouterr().err
    again = load_data(str(rec), PRE, str(tmp_path / "cache"), progress=False)
    assert torch.equal(again.images.read(), ref.images) and "decoded" not in capfd.readouterr().err
    # A disk that cannot hold the decoded images: streamed from the .rec instead, nothing written.
    monkeypatch.setattr("siamkit.data.limits.free_disk", lambda folder: 1000)
    streamed = load_data(str(rec), PRE, str(tmp_path / "small-disk"), progress=False)
    assert "streamed from the .rec" in capfd.readouterr().err and not (tmp_path / "small-disk").exists()
    assert isinstance(streamed.images, RecordRows)
    rows = torch.tensor([7, 0, 119, 4])
    assert torch.equal(streamed.images[rows].read(), ref.images[rows])
    assert np.array_equal(streamed.labels, ref.labels)


def _losses(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("elapsed_s", "images_per_s")} for row in csv.DictReader(f)]


def test_training_on_the_rec_is_the_run_on_the_folder(sets, tmp_path):
    from siamkit.train.loop import train

    rec, folder, _ = sets
    runs = {}
    for name, data in (("rec", rec), ("folder", folder)):
        cfg = tiny_config(tmp_path / name, data=str(data), steps=3, val_identities=4, image_size=[28, 24],
                          grayscale=True, cache_dir=str(tmp_path / "cache"), baseline_dlib=False,
                          cpu_tuning="off")  # measured kernel choices could differ between the two runs
        runs[name] = train(cfg, progress=False)
    assert _losses(runs["rec"]) == _losses(runs["folder"])  # every logged loss, to the last printed digit
    reports = [json.loads((runs[n] / "eval" / "report.json").read_text()) for n in ("rec", "folder")]
    assert reports[0] == reports[1]
    weights = [torch.load(runs[n] / "checkpoints" / "last.pt", weights_only=False)["model"] for n in ("rec", "folder")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_truncated_file_is_one_error_line(sets, tmp_path):
    rec, _, offsets = sets
    cut = tmp_path / "cut.rec"
    cut.write_bytes(rec.read_bytes()[: max(offsets.values()) + 12])
    cut.with_suffix(".idx").write_bytes(rec.with_suffix(".idx").read_bytes())
    with pytest.raises(SiamkitError, match=r"cut.rec is truncated: .*copy the complete file again") as e:
        load_data(str(cut), PRE, str(tmp_path / "cache"), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()


def test_a_file_that_is_not_recordio_is_one_error_line(sets, tmp_path):
    rec, _, _ = sets
    other = tmp_path / "other.rec"
    other.write_bytes(b"\x89PNG" + rec.read_bytes()[4:])
    other.with_suffix(".idx").write_bytes(rec.with_suffix(".idx").read_bytes())
    with pytest.raises(SiamkitError, match=r"other.rec is not a RecordIO file: .* record 0 at byte 0: no record "
                                           r"starts there \(magic 0x474e5089"):
        load_data(str(other), PRE, str(tmp_path / "cache"), progress=False)
    assert not (tmp_path / "cache").exists()


def test_damaged_records_are_skipped_in_one_warning_with_their_offsets(sets, tmp_path, capfd):
    rec, folder, offsets = sets
    data = bytearray(rec.read_bytes())
    data[offsets[17]: offsets[17] + 4] = b"XXXX"  # a damaged part header
    data[offsets[30] + 8 + 24: offsets[30] + 8 + 40] = bytes(16)  # the JPEG's first bytes zeroed
    damaged = tmp_path / "damaged.rec"
    damaged.write_bytes(bytes(data))
    damaged.with_suffix(".idx").write_bytes(rec.with_suffix(".idx").read_bytes())
    ds = load_data(str(damaged), PRE, str(tmp_path / "cache"), progress=False)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "skipped 2 malformed or undecodable record(s)" in warnings[0]
    assert f"record 17 at byte {offsets[17]} (no record starts there" in warnings[0]
    assert f"record 30 at byte {offsets[30]}" in warnings[0]
    ref = load_folder(folder, PRE)
    keep = [i for i in range(N_IDS * PER_ID) if i + 1 not in (17, 30)]
    assert torch.equal(ds.images.read(), ref.images[keep]) and np.array_equal(ds.labels, ref.labels[keep])


def test_training_streamed_from_the_rec_is_the_run_on_the_folder(sets, tmp_path, monkeypatch):
    """A disk too small for the decoded images: each step's images decoded from the .rec, the same run."""
    from siamkit.train.loop import train

    rec, folder, _ = sets
    common = dict(steps=3, val_identities=4, image_size=[28, 24], grayscale=True, baseline_dlib=False,
                  data_in_memory="no", cpu_tuning="off")
    reference = train(tiny_config(tmp_path / "folder", data=str(folder), cache_dir=str(tmp_path / "cache"), **common),
                      progress=False)
    monkeypatch.setattr("siamkit.data.limits.free_disk", lambda folder: 1000)
    streamed = train(tiny_config(tmp_path / "rec", data=str(rec), cache_dir=str(tmp_path / "small"), **common),
                     progress=False)
    assert not (tmp_path / "small").exists()  # nothing decoded to disk
    assert _losses(streamed) == _losses(reference)
    reports = [json.loads((run / "eval" / "report.json").read_text()) for run in (streamed, reference)]
    assert reports[0] == reports[1]


def test_a_rec_without_its_idx_is_one_error_line(sets, tmp_path):
    rec, _, _ = sets
    alone = tmp_path / "alone.rec"
    alone.write_bytes(rec.read_bytes())
    with pytest.raises(SiamkitError, match=r"alone.rec has no index .*alone.idx beside it"):
        load_data(str(alone), PRE, str(tmp_path / "cache"), progress=False)
    alone.with_suffix(".idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(SiamkitError, match=r"alone.idx line 2: expected 'index<TAB>offset'"):
        load_data(str(alone), PRE, str(tmp_path / "cache"), progress=False)
