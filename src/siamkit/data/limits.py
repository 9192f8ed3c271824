"""Limits on sizes, checked before anything is decoded or allocated: what will not fit is refused in one line.

MAX_IMAGE_SIDE bounds ``--image-size`` and ``align --size``. Face models take 112 px (ArcFace, siamkit's aligned
crops) to 224 px (ImageNet backbones); 1024 px is over four times that, so no real use is refused, while a
100,000 px side (30 GB for one RGB image) is refused before a single image is resized. Within the bound, a data
set can still outgrow the machine: ``check_fits_memory`` and ``check_fits_disk`` compare the decoded size
(images x channels x H x W bytes) with the memory available now and the free space of the decoded cache's disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import SiamkitError

MAX_IMAGE_SIDE = 1024
# Keep decoded images in memory only while they take at most this share of the memory available now.
MAX_MEMORY_SHARE = 0.5
GIB = 2**30


def check_side(side: int, option: str, minimum: int = 8) -> None:
    """``side`` within [minimum, MAX_IMAGE_SIDE] pixels, else one line naming ``option``."""
    if not minimum <= side <= MAX_IMAGE_SIDE:
        raise SiamkitError(f"{option} takes sides of {minimum} to {MAX_IMAGE_SIDE} pixels, got {side} (face models use "
                           f"112-224; larger sides cost memory and disk as the square of the side)")


def decoded_bytes(n_images: int, channels: int, image_size: tuple[int, int] | list[int]) -> int:
    """Bytes of ``n_images`` decoded uint8 images of ``channels`` x H x W."""
    return n_images * channels * int(image_size[0]) * int(image_size[1])


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent: nothing is created to find it)."""
    here = Path(path).absolute()
    for folder in (here, *here.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _size_text(n_images: int, channels: int, image_size) -> str:
    need = decoded_bytes(n_images, channels, image_size)
    return f"{n_images} images at {channels}x{image_size[0]}x{image_size[1]} decode to {need / GIB:.1f} GiB"


def check_fits_memory(n_images: int, channels: int, image_size, fix: str = "pass a smaller --image-size") -> None:
    """Refuse decoding into memory what would take more than MAX_MEMORY_SHARE of the memory available now."""
    available = available_memory()
    if available is not None and decoded_bytes(n_images, channels, image_size) > MAX_MEMORY_SHARE * available:
        raise SiamkitError(f"{_size_text(n_images, channels, image_size)}, more than half of the "
                           f"{available / GIB:.1f} GiB of memory available; {fix}")


def disk_shortfall(n_images: int, channels: int, image_size, folder: str | os.PathLike) -> str | None:
    """None where the free space of ``folder``'s disk holds the decoded images (or cannot be read), else the line
    saying how much they need and how much is free."""
    free = free_disk(folder)
    if free is None or decoded_bytes(n_images, channels, image_size) <= free:
        return None
    return (f"{_size_text(n_images, channels, image_size)}, more than the {free / GIB:.1f} GiB free on the disk "
            f"holding {folder}")


def check_fits_disk(n_images: int, channels: int, image_size, folder: str | os.PathLike) -> None:
    """Refuse building a decoded cache in ``folder`` that the free space of its disk cannot hold."""
    if disk_shortfall(n_images, channels, image_size, folder) is not None:
        raise SiamkitError(f"{_size_text(n_images, channels, image_size)} for the decoded cache, but the disk holding "
                           f"{folder} has {free_disk(folder) / GIB:.1f} GiB free; pass a smaller --image-size, "
                           f"--cache-dir on a larger disk, or --cache-dir none (decode into memory)")
