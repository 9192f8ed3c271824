"""Pair protocols: LFW pairs.txt read/write and folder_pairs, checked against hand-written files and brute force."""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from siamkit.data.pairs import Pair, folder_pairs, read_lfw_pairs, write_lfw_pairs
from siamkit.errors import SiamkitError

# name -> (extension, image numbers present)
TREE = {
    "Alice": ("jpg", [1, 2, 3]),
    "Bob": ("png", [1, 2]),
    "Carol": ("pgm", [1, 10]),
    "Dan_Smith": ("jpeg", [1, 2]),
}


def make_tree(root: Path, tree: dict[str, tuple[str, list[int]]] = TREE) -> Path:
    for name, (ext, indices) in tree.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.new("L", (2, 2), color=i).save(root / name / f"{name}_{i:04d}.{ext}")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "lfw")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# Two sets of 2 matched + 2 mismatched pairs, in the exact LFW layout (tabs).
TWO_SETS = (
    "2\t2\n"
    "Alice\t1\t2\n"
    "Bob\t1\t2\n"
    "Alice\t3\tBob\t1\n"
    "Carol\t10\tDan_Smith\t2\n"
    "Carol\t1\t10\n"
    "Dan_Smith\t1\t2\n"
    "Alice\t1\tCarol\t1\n"
    "Bob\t2\tDan_Smith\t1\n"
)
TWO_SETS_PAIRS = [
    Pair("Alice/Alice_0001.jpg", "Alice/Alice_0002.jpg", True, 0),
    Pair("Bob/Bob_0001.png", "Bob/Bob_0002.png", True, 0),
    Pair("Alice/Alice_0003.jpg", "Bob/Bob_0001.png", False, 0),
    Pair("Carol/Carol_0010.pgm", "Dan_Smith/Dan_Smith_0002.jpeg", False, 0),
    Pair("Carol/Carol_0001.pgm", "Carol/Carol_0010.pgm", True, 1),
    Pair("Dan_Smith/Dan_Smith_0001.jpeg", "Dan_Smith/Dan_Smith_0002.jpeg", True, 1),
    Pair("Alice/Alice_0001.jpg", "Carol/Carol_0001.pgm", False, 1),
    Pair("Bob/Bob_0002.png", "Dan_Smith/Dan_Smith_0001.jpeg", False, 1),
]


# ---------------------------------------------------------------- reading


def test_read_two_sets(tmp_path, root):
    assert read_lfw_pairs(write(tmp_path / "pairs.txt", TWO_SETS), root) == TWO_SETS_PAIRS


def test_read_whitespace_crlf_and_blank_lines(tmp_path, root):
    text = "  2   2 \r\n" + TWO_SETS.split("\n", 1)[1].replace("\t", "  ").replace("\n", "\r\n") + "\r\n\r\n"
    assert read_lfw_pairs(write(tmp_path / "pairs.txt", text), str(root)) == TWO_SETS_PAIRS


def test_read_single_number_header_means_one_set(tmp_path, root):
    # pairsDevTrain.txt style: "N" then N matched and N mismatched lines, all in fold 0.
    text = "1\nBob\t2\t1\nAlice\t2\tDan_Smith\t1\n"
    assert read_lfw_pairs(write(tmp_path / "dev.txt", text), root) == [
        Pair("Bob/Bob_0002.png", "Bob/Bob_0001.png", True, 0),
        Pair("Alice/Alice_0002.jpg", "Dan_Smith/Dan_Smith_0001.jpeg", False, 0),
    ]


def test_read_finds_upper_case_extension(tmp_path):
    root = tmp_path / "imgs"
    (root / "Eve").mkdir(parents=True)
    Image.new("L", (2, 2)).save(root / "Eve" / "Eve_0001.JPG", format="JPEG")
    Image.new("L", (2, 2)).save(root / "Eve" / "Eve_0002.bmp")
    make_tree(root, {"Fay": ("tif", [1])})
    pairs = read_lfw_pairs(write(tmp_path / "p.txt", "1\nEve\t1\t2\nEve\t2\tFay\t1\n"), root)
    assert [(p.left, p.right) for p in pairs] == [
        ("Eve/Eve_0001.JPG", "Eve/Eve_0002.bmp"),
        ("Eve/Eve_0002.bmp", "Fay/Fay_0001.tif"),
    ]


def error_message(pairs_file: Path, root: Path) -> str:
    with pytest.raises(SiamkitError) as info:
        read_lfw_pairs(pairs_file, root)
    message = str(info.value)
    assert "\n" not in message  # one clear line
    return message


def test_missing_file(tmp_path, root):
    message = error_message(tmp_path / "nope.txt", root)
    assert "nope.txt" in message and "does not exist" in message


def test_pairs_file_is_a_folder(tmp_path, root):
    assert "cannot be read" in error_message(tmp_path, root)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, root, text):
    message = error_message(write(tmp_path / "pairs.txt", text), root)
    assert "pairs.txt" in message and "empty" in message


def test_not_utf8(tmp_path, root):
    (tmp_path / "pairs.txt").write_bytes(b"1\n\xff\xfe\t1\t2\n")
    assert "not UTF-8" in error_message(tmp_path / "pairs.txt", root)


@pytest.mark.parametrize("header", ["abc", "2\tx", "0\t1", "1\t0", "1 2 3", "-1", "+1", "1.5"])
def test_bad_header(tmp_path, root, header):
    message = error_message(write(tmp_path / "pairs.txt", header + "\nAlice\t1\t2\nAlice\t1\tBob\t1\n"), root)
    assert "bad header on line 1" in message and repr(header.replace("\t", " ")) in message


def test_wrong_number_of_lines(tmp_path, root):
    # Header "2 2" promises 2 * (2 + 2) = 8 pair lines; give 7.
    text = TWO_SETS.rsplit("\n", 2)[0] + "\n"
    message = error_message(write(tmp_path / "pairs.txt", text), root)
    assert "8 pair lines" in message and "has 7" in message


def test_root_not_a_folder(tmp_path, root):
    message = error_message(write(tmp_path / "pairs.txt", TWO_SETS), root / "missing")
    assert "missing" in message and "not a folder" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("Alice\t1\tBob\t2", "line 2: a matched pair needs 3 fields 'name i j', got 4"),
        ("Alice\t1", "line 2: a matched pair needs 3 fields 'name i j', got 2"),
        ("Alice\tx\t2", "line 2: image number 'x' is not an integer >= 1"),
        ("Alice\t1\t0", "line 2: image number '0' is not an integer >= 1"),
        ("Alice\t1\t-2", "line 2: image number '-2' is not an integer >= 1"),
        ("..\t1\t2", "line 2: bad name '..'"),
        ("Alice\t1\t4", "line 2: image Alice/Alice_0004.<ext> not found"),
        ("Zed\t1\t2", "line 2: image Zed/Zed_0001.<ext> not found"),
    ],
)
def test_malformed_matched_line(tmp_path, root, line, expected):
    text = f"1\n{line}\nAlice\t1\tBob\t1\n"
    message = error_message(write(tmp_path / "pairs.txt", text), root)
    assert expected in message and "pairs.txt" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("Alice\t1\t2", "line 3: a mismatched pair needs 4 fields 'name1 i name2 j', got 3"),
        ("Alice\t1\tBob\t2.0", "line 3: image number '2.0' is not an integer >= 1"),
        ("Alice\t1\tBob\t3", "line 3: image Bob/Bob_0003.<ext> not found"),
    ],
)
def test_malformed_mismatched_line(tmp_path, root, line, expected):
    text = f"1\nAlice\t1\t2\n{line}\n"
    assert expected in error_message(write(tmp_path / "pairs.txt", text), root)


def test_all_problems_collected_first_five_shown(tmp_path, root):
    # 1 set of 4 + 4; lines 2..9. Problems: line 2 (fields), line 3 (x), line 4 (missing image),
    # line 6 (two missing images), line 7 (fields), line 9 (index 0) -> 7 problems, 5 shown, "... and 2 more".
    text = (
        "1\t4\n"
        "Alice\t1\n"  # line 2
        "Alice\tx\t2\n"  # line 3
        "Bob\t1\t9\n"  # line 4
        "Carol\t1\t10\n"  # line 5: fine
        "Zed\t1\tYan\t2\n"  # line 6: two images missing
        "Alice\t1\tBob\n"  # line 7
        "Alice\t1\tBob\t1\n"  # line 8: fine
        "Alice\t0\tBob\t1\n"  # line 9
    )
    message = error_message(write(tmp_path / "pairs.txt", text), root)
    assert "7 problem(s)" in message
    for shown in ["line 2:", "line 3:", "line 4:", "image Zed/Zed_0001", "image Yan/Yan_0002"]:
        assert shown in message
    assert "line 7:" not in message and "line 9:" not in message
    assert "... and 2 more" in message


# ---------------------------------------------------------------- writing


def test_round_trip(tmp_path, root):
    pairs = read_lfw_pairs(write(tmp_path / "pairs.txt", TWO_SETS), root)
    write_lfw_pairs(tmp_path / "out" / "again.txt", pairs)
    assert (tmp_path / "out" / "again.txt").read_text() == TWO_SETS  # the writer's layout is LFW's
    assert read_lfw_pairs(tmp_path / "out" / "again.txt", root) == pairs


def test_write_groups_by_fold_and_renumbers(tmp_path, root):
    # Folds 7 and 3, listed out of order: written as set 0 = fold 3, set 1 = fold 7, matched lines first.
    pairs = [
        Pair("Alice/Alice_0001.jpg", "Bob/Bob_0001.png", False, 7),
        Pair("Alice/Alice_0001.jpg", "Alice/Alice_0002.jpg", True, 7),
        Pair("Bob/Bob_0001.png", "Bob/Bob_0002.png", True, 3),
        Pair("Carol/Carol_0010.pgm", "Alice/Alice_0003.jpg", False, 3),
    ]
    write_lfw_pairs(tmp_path / "p.txt", pairs)
    assert (tmp_path / "p.txt").read_text() == (
        "2\t1\nBob\t1\t2\nCarol\t10\tAlice\t3\nAlice\t1\t2\nAlice\t1\tBob\t1\n"
    )
    assert read_lfw_pairs(tmp_path / "p.txt", root) == [
        Pair("Bob/Bob_0001.png", "Bob/Bob_0002.png", True, 0),
        Pair("Carol/Carol_0010.pgm", "Alice/Alice_0003.jpg", False, 0),
        Pair("Alice/Alice_0001.jpg", "Alice/Alice_0002.jpg", True, 1),
        Pair("Alice/Alice_0001.jpg", "Bob/Bob_0001.png", False, 1),
    ]


@pytest.mark.parametrize(
    "left",
    ["Alice_0001.jpg", "Alice/Bob_0001.jpg", "Alice/Alice_1.jpg", "Alice/Alice_0000.jpg", "a/b/b_0001.jpg",
     "Alice/Alice_0001", "../.._0001.jpg"],
)
def test_write_rejects_paths_off_pattern(tmp_path, left):
    pairs = [Pair(left, "Alice/Alice_0002.jpg", True, 0), Pair("A/A_0001.jpg", "B/B_0001.jpg", False, 0)]
    with pytest.raises(ValueError, match="pair path"):
        write_lfw_pairs(tmp_path / "p.txt", pairs)
    assert not (tmp_path / "p.txt").exists()  # nothing half-written


def test_write_rejects_uneven_folds_and_mixed_matched_names(tmp_path):
    with pytest.raises(ValueError, match="fold 1 has 1 matched and 0 mismatched"):
        write_lfw_pairs(tmp_path / "p.txt", [
            Pair("A/A_0001.jpg", "A/A_0002.jpg", True, 0), Pair("A/A_0001.jpg", "B/B_0001.jpg", False, 0),
            Pair("B/B_0001.jpg", "B/B_0002.jpg", True, 1),
        ])
    with pytest.raises(ValueError, match="two names"):
        write_lfw_pairs(tmp_path / "p.txt", [
            Pair("A/A_0001.jpg", "B/B_0002.jpg", True, 0), Pair("A/A_0001.jpg", "B/B_0001.jpg", False, 0),
        ])
    with pytest.raises(ValueError, match="no pairs"):
        write_lfw_pairs(tmp_path / "p.txt", [])


# ---------------------------------------------------------------- arbitrary input never crashes otherwise


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    tree = {"Alice": ("jpg", [1, 2, 10]), "Bob": ("png", [1, 2, 10]), "Carol": ("bmp", [1, 2, 10])}
    return make_tree(tmp_path_factory.mktemp("fuzz"), tree)


TOKENS = ["Alice", "Bob", "Carol", "Zed", "..", ".", "a/b", "1", "2", "3", "10", "0", "-1", "x", "1e3", "٣", "9" * 5000]


NAMES = st.sampled_from(["Alice", "Bob", "Carol"] * 6 + ["Zed"])  # Zed has no images
INDICES = st.sampled_from(["1", "2", "10"])


@st.composite
def near_lfw_text(draw) -> str:
    """Text shaped like a pairs file, mostly with a consistent header, so parsing reaches the pair lines."""
    n_sets, n = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    header = draw(st.sampled_from([f"{n_sets}\t{n}", f"{n}" if n_sets == 1 else f"{n_sets} {n}"]))
    lines = []
    for k in range(n_sets * 2 * n):
        if k % (2 * n) < n:
            good = [draw(NAMES), draw(INDICES), draw(INDICES)]
        else:
            good = [draw(NAMES), draw(INDICES), draw(NAMES), draw(INDICES)]
        junk = draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=5))
        lines.append(good if draw(st.integers(0, 19)) else junk)
    lines = draw(st.sampled_from([lines] * 4 + [lines[:-1], lines + [["Alice", "1", "2"]]]))
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    return sep.join([header] + ["\t".join(line) for line in lines])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(near_lfw_text(), st.text(max_size=200)).map(lambda t: t.encode("utf-8", "surrogatepass"))
       | st.binary(max_size=100))
def test_arbitrary_text_returns_pairs_or_siamkit_error(fuzz_dir, data):
    path = fuzz_dir / "fuzz_pairs.txt"
    path.write_bytes(data)
    try:
        pairs = read_lfw_pairs(path, fuzz_dir)
    except SiamkitError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert pairs and all((fuzz_dir / p.left).is_file() and (fuzz_dir / p.right).is_file() for p in pairs)


# ---------------------------------------------------------------- folder_pairs


def brute_force_genuine(labels) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] == labels[j]}


def check_folder_pairs(labels, seed, n_folds=10):
    a, b, same, fold = folder_pairs(np.asarray(labels), seed=seed, n_folds=n_folds)
    assert a.dtype.kind == b.dtype.kind == fold.dtype.kind == "i" and same.dtype == bool
    assert len(a) == len(b) == len(same) == len(fold)
    pairs = list(zip(a.tolist(), b.tolist()))
    assert all(i < j for i, j in pairs)
    assert len(set(pairs)) == len(pairs)  # no duplicates at all
    genuine = {p for p, s in zip(pairs, same) if s}
    impostor = [p for p, s in zip(pairs, same) if not s]
    assert genuine == brute_force_genuine(labels)
    assert all(labels[i] != labels[j] for i, j in impostor)
    n_all_impostor = len(labels) * (len(labels) - 1) // 2 - len(genuine)
    assert len(impostor) == min(len(genuine), n_all_impostor)
    assert fold.tolist() == [k % n_folds for k in range(len(same))]
    sizes = np.bincount(fold, minlength=n_folds)
    assert sizes.max() - sizes.min() <= 1
    return a, b, same, fold


def test_folder_pairs_sparse_case():
    # labels 0,0,1,1,1,2: genuine (0,1), (2,3), (2,4), (3,4) = 4 of 15 pairs, so 4 of the 11 impostor pairs.
    labels = [0, 0, 1, 1, 1, 2]
    a, b, same, fold = check_folder_pairs(labels, seed=0, n_folds=3)
    assert len(same) == 8 and same.sum() == 4
    assert np.bincount(fold).tolist() == [3, 3, 2]


def test_folder_pairs_uses_all_impostors_when_fewer():
    # 5 images of "x" and 1 of "y": 10 genuine pairs but only 5 impostor pairs (each x with the y).
    labels = np.array(["x"] * 5 + ["y"])
    a, b, same, _ = check_folder_pairs(labels, seed=3)
    assert len(same) == 15
    assert sorted(zip(a[~same].tolist(), b[~same].tolist())) == [(i, 5) for i in range(5)]


def test_folder_pairs_deterministic_per_seed():
    labels = np.repeat(np.arange(20), 3)
    first, again = folder_pairs(labels, seed=5), folder_pairs(labels, seed=5)
    other = folder_pairs(labels, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


@pytest.mark.parametrize(
    "labels, n_draw",
    [
        ([0, 0, 1, 1, 2, 2], 3),  # 3 of 12 impostor pairs: rejection sampling
        ([0, 0, 0, 1, 1], 4),  # 4 of 6 impostor pairs: choice among all of them
    ],
)
def test_folder_pairs_impostors_uniform(labels, n_draw):
    runs = 1500
    counts = Counter()
    for seed in range(runs):
        a, b, same, _ = folder_pairs(np.array(labels), seed=seed)
        counts.update(zip(a[~same].tolist(), b[~same].tolist()))
    possible = {(i, j) for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] != labels[j]}
    assert set(counts) == possible
    expected = runs * n_draw / len(possible)
    # Binomial sd <= sqrt(expected) ~ 20-35 here; 6 sd of slack keeps this test from flaking.
    assert all(abs(c - expected) < 6 * expected**0.5 for c in counts.values()), counts


def test_folder_pairs_six_thousand_images():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1500, 6000)
    a, b, same, fold = folder_pairs(labels, seed=1)
    counts = np.bincount(labels)
    n_genuine = int((counts * (counts - 1) // 2).sum())
    assert same.sum() == n_genuine and (~same).sum() == n_genuine
    assert np.all(a < b) and np.all((labels[a] == labels[b]) == same)
    assert len(np.unique(a * 6000 + b)) == len(a)


@pytest.mark.parametrize("labels", [[0, 0, 0], [0, 1, 2, 3], [0], []])
def test_folder_pairs_needs_two_identities_with_two_images(labels):
    with pytest.raises(SiamkitError, match="at least two identities with two images each"):
        folder_pairs(np.array(labels, dtype=int), seed=0)


def test_folder_pairs_bad_arguments():
    with pytest.raises(ValueError, match="one-dimensional"):
        folder_pairs(np.zeros((2, 2)), seed=0)
    with pytest.raises(ValueError, match="n_folds"):
        folder_pairs(np.array([0, 0, 1, 1]), seed=0, n_folds=0)


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 5), max_size=25), seed=st.integers(0, 2**32 - 1), n_folds=st.integers(1, 10))
def test_folder_pairs_properties(labels, seed, n_folds):
    genuine = brute_force_genuine(labels)
    if not genuine or len(genuine) == len(labels) * (len(labels) - 1) // 2:
        with pytest.raises(SiamkitError):
            folder_pairs(np.array(labels, dtype=int), seed=seed, n_folds=n_folds)
    else:
        check_folder_pairs(labels, seed, n_folds)


# --- the cap on genuine pairs (large held-out sets) ---------------------------------------------


def test_folder_pairs_cap_draws_distinct_genuine_pairs_of_large_identities():
    # 3 identities of 3,000 images: 13.5 million genuine pairs, never listed; pair numbers near the end of a
    # group (j close to 3,000) exercise the square-root decoding where float rounding could be off by one.
    labels = np.repeat([2, 0, 1], 3000)
    np.random.default_rng(0).shuffle(labels)
    a, b, same, fold = folder_pairs(labels, seed=3, max_genuine=20_000)
    assert same.sum() == 20_000 and (~same).sum() == 20_000
    assert np.all(a < b) and np.all((labels[a] == labels[b]) == same)
    assert len(np.unique(a * len(labels) + b)) == len(a)  # distinct pairs
    again = folder_pairs(labels, seed=3, max_genuine=20_000)
    assert all(np.array_equal(x, y) for x, y in zip((a, b, same, fold), again))


def test_folder_pairs_cap_above_the_genuine_pairs_changes_nothing():
    labels = np.random.default_rng(1).integers(0, 40, 300)
    uncapped = folder_pairs(labels, seed=5)
    capped = folder_pairs(labels, seed=5, max_genuine=int(uncapped[2].sum()))
    assert all(np.array_equal(x, y) for x, y in zip(uncapped, capped))


def test_folder_pairs_cap_draws_genuine_pairs_uniformly():
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3]  # 1 + 3 + 10 = 14 genuine pairs, in groups of unequal sizes
    runs, cap = 1500, 5
    counts = Counter()
    for seed in range(runs):
        a, b, same, _ = folder_pairs(np.array(labels), seed=seed, max_genuine=cap)
        assert same.sum() == cap
        counts.update(zip(a[same].tolist(), b[same].tolist()))
    assert set(counts) == set(brute_force_genuine(labels))
    expected = runs * cap / 14
    # Binomial sd <= sqrt(expected) ~ 23; 6 sd of slack keeps this test from flaking.
    assert all(abs(c - expected) < 6 * expected**0.5 for c in counts.values()), counts
