""".bin validation sets (data/binsets.py): a .bin of AT&T s31-s40 pairs, written here in every encoding insightface's
packs use, gives the report of the same images as a folder with a pairs.txt of the same pairs and folds; a pickle
that asks for anything else runs nothing and is refused in one line; --eval-data evaluates .bin sets in training."""
from __future__ import annotations

import builtins
import contextlib
import csv
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamkit.cli import main
from siamkit.data.binsets import contiguous_folds, read_binset
from siamkit.errors import SiamkitError
from tiny_run import one_torch_thread, tiny_config  # noqa: F401 (fixture)

SETS, PER_SET = 10, 3  # pairs.txt: 10 sets of 3 matched + 3 mismatched pairs


def encoded(att_faces: Path, person: int, k: int) -> bytes:
    """AT&T image k of s<person>: PNG for even k, JPEG for odd k (a .bin holds either)."""
    buf = io.BytesIO()
    Image.open(att_faces / f"s{person}" / f"{k}.pgm").save(buf, format="PNG" if k % 2 == 0 else "JPEG", quality=90)
    return buf.getvalue()


def make_pairs(seed: int = 3) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
    """LFW's layout over s31-s40: per set, PER_SET matched pairs then PER_SET mismatched ones."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(SETS):
        for _ in range(PER_SET):
            person, (a, b) = int(rng.integers(31, 41)), rng.choice(np.arange(1, 11), 2, replace=False)
            pairs.append(((person, int(a)), (person, int(b)), True))
        for _ in range(PER_SET):
            p, q = rng.choice(np.arange(31, 41), 2, replace=False)
            pairs.append(((int(p), int(rng.integers(1, 11))), (int(q), int(rng.integers(1, 11))), False))
    return pairs


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump((images, issame), f, 2) writes: str as BINSTRING, no _codecs."""
    body = b"".join(b"T" + struct.pack("<I", len(im)) + im for im in images)
    flags = b"".join(b"\x88" if s else b"\x89" for s in issame)
    return b"\x80\x02]q\x00(" + body + b"e]q\x01(" + flags + b"e\x86q\x02."


@pytest.fixture(scope="module")
def pair_sets(att_faces, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(folder with pairs.txt, {kind: .bin}) of the same pairs: bytes (protocol 5), cv2.imencode-style [N, 1] uint8
    arrays (protocol 5 and protocol 2), and a Python 2 pickle."""
    base = tmp_path_factory.mktemp("binset")
    folder = base / "folder"
    pairs = make_pairs()
    lines = [f"{SETS}\t{PER_SET}"]
    for (p, a), (q, b), same in pairs:
        lines.append(f"s{p}\t{a}\t{b}" if same else f"s{p}\t{a}\ts{q}\t{b}")
    for person in range(31, 41):
        (folder / f"s{person}").mkdir(parents=True)
        for k in range(1, 11):
            (folder / f"s{person}" / f"s{person}_{k:04d}.jpg").write_bytes(encoded(att_faces, person, k))
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    images = [encoded(att_faces, *side) for left, right, _ in pairs for side in (left, right)]
    issame = [same for *_, same in pairs]
    arrays = [np.frombuffer(im, dtype=np.uint8).reshape(-1, 1).copy() for im in images]
    bins = {"bytes": pickle.dumps((images, issame), protocol=pickle.HIGHEST_PROTOCOL),
            "arrays": pickle.dumps((arrays, issame), protocol=pickle.HIGHEST_PROTOCOL),
            "arrays-protocol2": pickle.dumps((arrays, issame), protocol=2),
            "python2": py2_pickle(images, issame)}
    paths = {}
    for kind, data in bins.items():
        paths[kind] = base / f"{kind}.bin"
        paths[kind].write_bytes(data)
    return folder, paths


def test_every_encoding_reads_back_the_same_images_and_flags(pair_sets, att_faces):
    folder, bins = pair_sets
    pairs = make_pairs()
    expected = [encoded(att_faces, *side) for left, right, _ in pairs for side in (left, right)]
    for kind, path in bins.items():
        images, issame = read_binset(path)
        assert images == expected, kind
        assert issame.tolist() == [same for *_, same in pairs], kind


def test_contiguous_folds_are_kfold_without_shuffling():
    assert contiguous_folds(60).tolist() == np.repeat(np.arange(10), 6).tolist()
    # 23 pairs: three folds of 3, seven of 2, in file order (scikit-learn's KFold(10))
    assert contiguous_folds(23).tolist() == [0] * 3 + [1] * 3 + [2] * 3 + sum(([f] * 2 for f in range(3, 10)), [])


def _evaluate(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", *args, "--no-baseline-dlib"]) == 0


def test_a_bin_gives_the_report_of_its_folder_and_pairs_txt(pair_sets, trained_run, tmp_path):
    folder, bins = pair_sets
    _evaluate(str(trained_run), "--data", str(folder), "--pairs", str(folder / "pairs.txt"), "--out",
              str(tmp_path / "folder"))
    ref = json.loads((tmp_path / "folder" / "report.json").read_text())
    assert ref["n_pairs"] == SETS * 2 * PER_SET
    for kind, path in bins.items():
        _evaluate(str(trained_run), "--data", str(path), "--out", str(tmp_path / kind))
        report = json.loads((tmp_path / kind / "report.json").read_text())
        # The same pixels, pairs and folds. The .bin embeds each image once per pair it is in, the folder once,
        # so batches differ; in eval mode an image's embedding does not depend on its batch on this CPU path, so
        # the reports are equal (were batch composition to change rounding, the float32 scores would move by
        # ~1e-7 and a rank metric only where two pairs' scores tie to that precision).
        assert report == ref, kind


class Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


# protocol 4 keeps Python 3's module names (protocol 2 would write builtins as __builtin__)
@pytest.mark.parametrize("call, code, protocol", [(os.system, "touch {marker}", 2),
                                                   (builtins.exec, "open({marker!r}, 'w').write('ran')", 4)])
def test_a_malicious_pickle_runs_nothing_and_is_refused_in_one_line(tmp_path, call, code, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil(call, code.format(marker=str(marker)))], [True]), protocol=protocol))
    with pytest.raises(SiamkitError) as e:
        read_binset(path)
    message = str(e.value)
    assert "\n" not in message and "refused to unpickle" in message and "nothing in it was run" in message
    assert f"{call.__module__}.{call.__name__}" in message  # the name it asked for: posix.system, builtins.exec
    assert not marker.exists()


def test_a_codec_other_than_latin1_is_refused(tmp_path):
    """_codecs.encode is admitted for protocol-2 bytes only: any other codec is refused, not looked up."""
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x08\x00\x00\x00rot13-x1\x86R.")
    with pytest.raises(SiamkitError, match="not a readable .bin validation set"):
        read_binset(path)


def test_training_evaluates_eval_data_every_n_steps_and_reports_it_at_the_end(pair_sets, trained_run, att_split,
                                                                              tmp_path):
    from siamkit.train.loop import train

    _, bins = pair_sets
    # From the trained backbone (fresh heads): its scores spread, where a 2-step model from scratch scores every pair
    # about 1.0 and float32 rounding would decide the ranks.
    run = train(tiny_config(tmp_path / "run", data=str(att_split[0]), backbone="resnet18", pretrained=str(trained_run),
                            steps=2, eval_every=1, eval_data=[str(bins["bytes"])]), progress=False)
    with open(run / "eval" / "eval_data.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["set"]) for r in rows] == [("1", "bytes"), ("2", "bytes")]
    assert (run / "checkpoints" / "best.pt").is_file()  # no held-out identities: chosen on the .bin
    final = json.loads((run / "eval" / "bytes" / "report.json").read_text())
    assert float(rows[-1]["accuracy_mean"]) == final["accuracy_mean"]
    # The final report is the final model's: evaluate gives it again from last.pt (rank metrics of spread scores,
    # unmoved by the ~1e-7 rounding of a different memory layout).
    _evaluate(str(run / "checkpoints" / "last.pt"), "--data", str(bins["bytes"]), "--out", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    for key in ("n_pairs", "roc_auc", "eer", "accuracy_mean", "tar_at_far", "baseline"):
        assert again[key] == final[key], key


def test_a_bin_is_refused_as_training_data(pair_sets, tmp_path):
    _, bins = pair_sets
    with pytest.raises(SiamkitError, match=r"is a validation set of pairs, nothing to train on; .* --eval-data"):
        tiny_config(tmp_path / "run", data=str(bins["bytes"])).validate()
