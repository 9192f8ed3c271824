"""data/limits.py: the size bound, and what will not fit in memory or on disk refused before anything is decoded."""
from __future__ import annotations

from collections import namedtuple

import pytest

from siamkit.data import limits
from siamkit.data.limits import MAX_IMAGE_SIDE, check_fits_disk, check_fits_memory, check_side, decoded_bytes
from siamkit.errors import SiamkitError


def test_sides_within_the_bound_pass_and_others_are_one_line():
    for side in (8, 112, MAX_IMAGE_SIDE):
        check_side(side, "--image-size")
    for side in (7, MAX_IMAGE_SIDE + 1, 100_000):
        with pytest.raises(SiamkitError, match=f"--image-size takes sides of 8 to {MAX_IMAGE_SIDE} pixels, got {side}"):
            check_side(side, "--image-size")


def test_decoded_bytes_by_hand():
    assert decoded_bytes(6101, 3, (112, 112)) == 6101 * 3 * 112 * 112
    assert decoded_bytes(1, 1, [8, 9]) == 72


def test_memory_check_refuses_over_half_of_what_is_available(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 2 * 3 * 100 * 100 * 10)  # twice 10 images at 3x100x100
    check_fits_memory(10, 3, (100, 100))  # exactly half: kept
    with pytest.raises(SiamkitError, match="11 images at 3x100x100 decode to 0.0 GiB, more than half of the 0.0 GiB "
                                           "of memory available; pass a smaller --image-size"):
        check_fits_memory(11, 3, (100, 100))
    monkeypatch.setattr(limits, "available_memory", lambda: None)  # unknown: nothing is refused on a guess
    check_fits_memory(10**9, 3, (1024, 1024))


def test_disk_check_reads_the_nearest_existing_folder_and_creates_none(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    asked = []
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda path: asked.append(path) or usage(100, 90, 10))
    check_fits_disk(10, 1, (1, 1), tmp_path / "not" / "yet")
    with pytest.raises(SiamkitError, match="for the decoded cache, but the disk holding"):
        check_fits_disk(11, 1, (1, 1), tmp_path / "not" / "yet")
    assert asked[0] == tmp_path and not (tmp_path / "not").exists()


def test_the_real_machine_answers():
    assert limits.available_memory() > 0 and limits.free_disk("/") > 0
