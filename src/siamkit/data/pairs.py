"""Verification pair protocols: LFW ``pairs.txt`` (read/write) and all-genuine + sampled-impostor pairs."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import IMAGE_EXTENSIONS
from ..errors import SiamkitError
from ..fileio import atomic_write_text

# The extensions the folder loader reads, tried in this order, lower then upper case.
_TRY_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS) + tuple(e[1:].upper() for e in IMAGE_EXTENSIONS)

_MAX_SHOWN = 5  # problems quoted in one error message; the rest are counted
_DIGITS = re.compile(r"[0-9]+")
_PAIR_PATH = re.compile(r"(?P<dir>[^/\s]+)/(?P<name>[^/\s]+)_(?P<idx>[0-9]+)\.(?P<ext>[^/.\s]+)")


@dataclass(frozen=True)
class Pair:
    """Two images (paths relative to the data root), whether they show the same identity, and their fold."""

    left: str
    right: str
    same: bool
    fold: int


def _valid_name(name: str) -> bool:
    # The name becomes a folder under the root: it must not escape it or hide a separator.
    return name not in (".", "..") and not any(c in name for c in "/\\\x00")


def _parse_index(text: str) -> int | None:
    """The 1-based image number, or None when ``text`` is not a plain positive integer."""
    if not _DIGITS.fullmatch(text):
        return None
    try:
        value = int(text)
    except ValueError:  # more digits than Python converts (int_max_str_digits)
        return None
    return value if value >= 1 else None


def _image_name(name: str, index: int) -> str:
    return f"{name}_{index:04d}"


class _ImageFinder:
    """Finds ``<name>/<name>_NNNN.<ext>`` under a root, listing each identity's folder once."""

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[str, frozenset[str]] = {}

    def find(self, name: str, index: int) -> str | None:
        listing = self._listings.get(name)
        if listing is None:
            try:
                listing = frozenset(os.listdir(self.root / name))
            except (OSError, ValueError):  # missing folder, not a folder, unusable name
                listing = frozenset()
            self._listings[name] = listing
        stem = _image_name(name, index)
        for ext in _TRY_EXTENSIONS:
            if f"{stem}.{ext}" in listing:
                return f"{name}/{stem}.{ext}"
        return None


def _raise_problems(pairs_file: Path, root: Path, problems: list[str]) -> None:
    shown = "; ".join(problems[:_MAX_SHOWN])
    more = f"; ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
    raise SiamkitError(
        f"pairs file {pairs_file}: {len(problems)} problem(s): {shown}{more}. Fix these lines, or point the "
        f"image root (now {root}) at the folder holding <name>/<name>_NNNN.<ext>"
    )


def read_lfw_pairs(pairs_file: str | os.PathLike, root: str | os.PathLike) -> list[Pair]:
    """Read an LFW-format pairs file (``pairs.txt``, ``pairsDevTrain.txt``...); folds are its sets in file order.

    Blank lines are ignored. Every malformed line and missing image is collected and reported at once.
    """
    pairs_file, root = Path(pairs_file), Path(root)
    try:
        raw = pairs_file.read_bytes()
    except FileNotFoundError:
        raise SiamkitError(f"pairs file {pairs_file} does not exist; pass the path of an LFW pairs.txt") from None
    except OSError as e:
        raise SiamkitError(f"pairs file {pairs_file} cannot be read ({e.strerror}); pass a readable file") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors write one) is not line 1's text
    except UnicodeDecodeError:
        raise SiamkitError(f"pairs file {pairs_file} is not UTF-8 text; pass an LFW pairs.txt") from None

    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise SiamkitError(f"pairs file {pairs_file} is empty; pass an LFW pairs.txt ('SETS<TAB>N' then pair lines)")

    header_no, header = lines[0]
    counts = [_parse_index(f) for f in header] if len(header) in (1, 2) else [None]
    if None in counts:
        raise SiamkitError(
            f"pairs file {pairs_file}: bad header on line {header_no} {' '.join(header)!r}; the first line must be "
            f"'SETS<TAB>N' (e.g. '10\\t300') or 'N' (one set), with positive integers"
        )
    n_sets, n = (1, counts[0]) if len(counts) == 1 else (counts[0], counts[1])

    body = lines[1:]
    if len(body) != n_sets * 2 * n:
        raise SiamkitError(
            f"pairs file {pairs_file}: the header says {n_sets} set(s) of {n} matched + {n} mismatched pairs = "
            f"{n_sets * 2 * n} pair lines, but the file has {len(body)}; fix the header or the pair lines"
        )
    if not root.is_dir():
        raise SiamkitError(f"image root {root} is not a folder; pass the folder holding <name>/<name>_NNNN.jpg")

    finder = _ImageFinder(root)
    problems: list[str] = []
    pairs: list[Pair] = []
    for k, (no, fields) in enumerate(body):
        fold, matched = k // (2 * n), k % (2 * n) < n
        if matched:
            if len(fields) != 3:
                problems.append(f"line {no}: a matched pair needs 3 fields 'name i j', got {len(fields)}")
                continue
            specs = [(fields[0], fields[1]), (fields[0], fields[2])]
        else:
            if len(fields) != 4:
                problems.append(f"line {no}: a mismatched pair needs 4 fields 'name1 i name2 j', got {len(fields)}")
                continue
            specs = [(fields[0], fields[1]), (fields[2], fields[3])]
        bad = [f"bad name {name!r}" for name, _ in specs if not _valid_name(name)]
        bad += [f"image number {idx!r} is not an integer >= 1" for _, idx in specs if _parse_index(idx) is None]
        if bad:
            problems.extend(f"line {no}: {b}" for b in dict.fromkeys(bad))
            continue
        found = []
        for name, idx in specs:
            index = _parse_index(idx)
            assert index is not None
            path = finder.find(name, index)
            if path is None:
                problems.append(f"line {no}: image {name}/{_image_name(name, index)}.<ext> not found")
            found.append(path)
        if None not in found:
            pairs.append(Pair(left=found[0], right=found[1], same=matched, fold=fold))
    if problems:
        _raise_problems(pairs_file, root, problems)
    return pairs


def _split_pair_path(path: str) -> tuple[str, int]:
    """(name, index) of ``<name>/<name>_%04d.<ext>``; ValueError for anything else."""
    m = _PAIR_PATH.fullmatch(path)
    if m is None or m["dir"] != m["name"] or not _valid_name(m["name"]):
        raise ValueError(f"pair path {path!r} does not follow '<name>/<name>_NNNN.<ext>'")
    index = _parse_index(m["idx"])
    if index is None or m["idx"] != f"{index:04d}":
        raise ValueError(f"pair path {path!r}: the image number must be >= 1 and written as %04d")
    return m["name"], index


def write_lfw_pairs(path: str | os.PathLike, pairs: list[Pair]) -> None:
    """Write ``pairs`` as an LFW pairs file, atomically: one set per fold (ascending), matched pairs first.

    Every fold must hold the same number N of matched and of mismatched pairs (the format's 'SETS<TAB>N').
    Folds are renumbered 0..SETS-1 on reading back; image extensions are not stored (the reader finds them).
    """
    if not pairs:
        raise ValueError("no pairs to write")
    folds = sorted({p.fold for p in pairs})
    sets = []
    for fold in folds:
        matched = [p for p in pairs if p.fold == fold and p.same]
        mismatched = [p for p in pairs if p.fold == fold and not p.same]
        sets.append((fold, matched, mismatched))
    n = len(sets[0][1])
    for fold, matched, mismatched in sets:
        if len(matched) != n or len(mismatched) != n:
            raise ValueError(
                f"fold {fold} has {len(matched)} matched and {len(mismatched)} mismatched pairs; the LFW format "
                f"needs the same number N in every fold (fold {folds[0]} has {n})"
            )
    lines = [f"{len(sets)}\t{n}"]
    for _, matched, mismatched in sets:
        for p in matched:
            (name_a, i), (name_b, j) = _split_pair_path(p.left), _split_pair_path(p.right)
            if name_a != name_b:
                raise ValueError(f"matched pair {p.left!r}, {p.right!r} has two names; it must be one identity")
            lines.append(f"{name_a}\t{i}\t{j}")
        for p in mismatched:
            (name_a, i), (name_b, j) = _split_pair_path(p.left), _split_pair_path(p.right)
            lines.append(f"{name_a}\t{i}\t{name_b}\t{j}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _genuine_pairs(order: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All i<j pairs inside each identity group (``order[starts[g]:starts[g]+counts[g]]`` ascending)."""
    a_parts, b_parts = [], []
    triu: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start, m in zip(starts[counts >= 2].tolist(), counts[counts >= 2].tolist()):
        if m not in triu:
            triu[m] = np.triu_indices(m, 1)
        members = order[start : start + m]
        a_parts.append(members[triu[m][0]])
        b_parts.append(members[triu[m][1]])
    if not a_parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(a_parts), np.concatenate(b_parts)


def _sample_genuine_pairs(
    order: np.ndarray, starts: np.ndarray, counts: np.ndarray, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` distinct genuine pairs drawn uniformly: pair numbers drawn without replacement, then decoded."""
    per_group = counts * (counts - 1) // 2
    group_end = np.cumsum(per_group)
    picks = np.sort(rng.choice(int(group_end[-1]), size=m, replace=False))
    g = np.searchsorted(group_end, picks, side="right")
    r = picks - (group_end[g] - per_group[g])  # the pair's number inside its group
    # Number the pairs (i, j), i < j, by j first: j*(j-1)/2 pairs come before those of j, so j solves a quadratic.
    j = np.floor((1 + np.sqrt(1 + 8 * r.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > r  # float rounding near a triangular number, either way
    j += (j + 1) * j // 2 <= r
    i = r - j * (j - 1) // 2
    return order[starts[g] + i], order[starts[g] + j]


def _all_impostor_pairs(order: np.ndarray, codes: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every different-label pair (i<j), built without an N x N matrix: output-sized memory only."""
    n = len(order)
    # In label-sorted order, position p pairs with every position from the end of its group to n.
    group_end = ends[codes[order]]
    lengths = n - group_end
    a_pos = np.repeat(np.arange(n), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    b_pos = np.repeat(group_end, lengths) + offsets
    a, b = order[a_pos], order[b_pos]
    return np.minimum(a, b), np.maximum(a, b)


def _sample_impostor_keys(codes: np.ndarray, k: int, n_impostor: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct different-label pairs as keys i*N+j, uniformly, by rejection (for k <= n_impostor / 4)."""
    n = len(codes)
    accept = 2 * n_impostor / (n * n)  # chance that an ordered draw (i, j) is an impostor pair
    keys = np.empty(0, np.int64)
    while len(keys) < k:
        # Expected draws to go from len(keys) to k distinct out of n_impostor (coupon collector), plus 5%.
        distinct_draws = n_impostor * np.log((n_impostor - len(keys)) / (n_impostor - k))
        draws = int(distinct_draws / accept * 1.05) + 64
        i, j = rng.integers(0, n, draws), rng.integers(0, n, draws)
        ok = codes[i] != codes[j]
        new = np.minimum(i, j)[ok].astype(np.int64) * n + np.maximum(i, j)[ok]
        keys = np.sort(np.concatenate([keys, new]))  # sort + diff: np.unique's hash path is far slower here
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    # The distinct keys of iid uniform draws form a random set that no relabelling of pairs changes in law,
    # so a uniform k-subset of it is a uniform k-subset of all impostor pairs.
    return keys[rng.choice(len(keys), size=k, replace=False)] if len(keys) > k else keys


def folder_pairs(
    labels: np.ndarray, seed: int, n_folds: int = 10, max_genuine: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(idx_a, idx_b, same, fold): every genuine pair i<j plus as many distinct random impostor pairs, shuffled.

    If fewer impostor pairs exist than genuine ones, all impostor pairs are used. ``fold = position % n_folds``
    after the shuffle, so folds differ in size by at most one. Deterministic for a given ``seed``.
    ``max_genuine``: above this many genuine pairs, that many distinct ones are drawn uniformly (seeded), without
    listing them all, so that memory follows the cap and not the square of the identities' sizes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    n = len(codes)
    order = np.argsort(codes, kind="stable")  # stable: members of a group stay in ascending index order
    counts = np.bincount(codes) if n else np.empty(0, np.int64)
    ends = np.cumsum(counts)
    n_genuine = int((counts * (counts - 1) // 2).sum())
    n_impostor = n * (n - 1) // 2 - n_genuine
    if n_genuine == 0 or n_impostor == 0:
        raise SiamkitError(
            f"cannot make verification pairs from {n} images of {len(counts)} identities ({n_genuine} genuine, "
            f"{n_impostor} impostor pairs possible): at least two identities with two images each are needed"
        )

    rng = np.random.default_rng(seed)
    if max_genuine is not None and n_genuine > max_genuine:
        gen_a, gen_b = _sample_genuine_pairs(order, ends - counts, counts, max_genuine, rng)
        n_genuine = max_genuine
    else:
        gen_a, gen_b = _genuine_pairs(order, ends - counts, counts)
    k = min(n_genuine, n_impostor)
    if 4 * k >= n_impostor:
        # Dense case: rejection would redraw many duplicates, and listing them all costs at most 4k pairs.
        imp_a, imp_b = _all_impostor_pairs(order, codes, ends)
        pick = rng.choice(n_impostor, size=k, replace=False)
        imp_a, imp_b = imp_a[pick], imp_b[pick]
    else:
        keys = _sample_impostor_keys(codes, k, n_impostor, rng)
        imp_a, imp_b = keys // n, keys % n

    idx_a = np.concatenate([gen_a, imp_a]).astype(np.int64)
    idx_b = np.concatenate([gen_b, imp_b]).astype(np.int64)
    same = np.concatenate([np.ones(n_genuine, bool), np.zeros(k, bool)])
    perm = rng.permutation(len(same))
    fold = np.arange(len(same), dtype=np.int64) % n_folds
    return idx_a[perm], idx_b[perm], same[perm], fold
