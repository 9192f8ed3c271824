"""`siamkit align SRC DST`: every image of a folder aligned into DST, resumable, on worker processes.

DST mirrors SRC's relative paths (an identity tree or a flat folder). Progress is kept in
DST/.align_journal.jsonl, one line per finished image, appended as it finishes: a rerun reads it and redoes
nothing that is done (an image's crop is written atomically, so a crop on disk is complete). At the end
DST/align_report.json lists what was aligned, what was aligned without a detection (apart, never counted as
found), what had no face and what could not be read, each with its reason, and the alignment used (template,
size, margin) which `siamkit train` stores in its checkpoint.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .._version import __version__
from ..data.pixels import MIN_IMAGE_SIDE, upright
from ..errors import SiamkitError, info
from ..fileio import atomic_write, atomic_write_json
from ..outputs import check_output_folder
from ..progress import progress_bar
from .align import PICKS, pick_face, template
from .chips import DLIB_CHIP_SIZE, DLIB_TEMPLATE, TEMPLATES, cut_face, dlib_alignment
from .detect import DETECTOR_DESCRIPTION, LANDMARK_NAMES, check_installed, detect_faces, landmarks_in_frame

REPORT = "align_report.json"
JOURNAL = ".align_journal.jsonl"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
PILLOW_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
MIN_SIDE = MIN_IMAGE_SIDE  # below this many pixels a side there is no face to find (dlib's smallest is about 20 px)
MAX_IMAGE_PIXELS = 40_000_000  # refused before decoding (decompression-bomb guard, as the data loader's)
UNDETECTED = ("skip", "frame")
DETECTOR = DETECTOR_DESCRIPTION


@dataclass(frozen=True)
class AlignOptions:
    size: int = 112
    margin: float = 0.0
    pick: str = "largest"
    undetected: str = "skip"  # "frame": a photo without a detection is aligned with the whole frame as the face
    template: str = "siamkit"  # siamkit's 5-point template (faces/align.py), or dlib's face chip (faces/chips.py)

    def check(self) -> None:
        template(self.size, self.margin)  # raises on a bad size or margin
        if self.pick not in PICKS:
            raise SiamkitError(f"--pick {self.pick} is not one of: {', '.join(PICKS)}")
        if self.undetected not in UNDETECTED:
            raise SiamkitError(f"--undetected {self.undetected} is not one of: {', '.join(UNDETECTED)}")
        if self.template not in TEMPLATES:
            raise SiamkitError(f"--template {self.template} is not one of: {', '.join(TEMPLATES)}")
        if self.template == DLIB_TEMPLATE and (self.size, self.margin) != (DLIB_CHIP_SIZE, 0.0):
            raise SiamkitError(f"--template dlib cuts dlib's {DLIB_CHIP_SIZE} px chip (padding 0.25), what dlib's "
                               f"model reads; drop --size and --margin")

    def alignment(self, photo_box: list[float] | None = None) -> dict:
        """What a model trained on the output needs to know to align its inputs the same way; ``photo_box`` is
        the median box of the crops that showed the photos themselves (`median_box`)."""
        if self.template == DLIB_TEMPLATE:
            return dlib_alignment()
        return {"size": self.size, "margin": self.margin, "landmarks": list(LANDMARK_NAMES),
                "template": [[round(float(v), 4) for v in p] for p in template(self.size, self.margin)],
                "detector": DETECTOR, "photo_box": photo_box}

    @classmethod
    def for_template(cls, name: str, size: int | None = None, margin: float | None = None, **others) -> "AlignOptions":
        """--template NAME with --size and --margin left out (None): the template's own size and no margin."""
        default = DLIB_CHIP_SIZE if name == DLIB_TEMPLATE else cls.size
        return cls(size=default if size is None else size, margin=0.0 if margin is None else margin, template=name,
                   **others)


@dataclass
class AlignResult:
    """The outcome of one image: status is aligned, aligned_without_detection, no_face or unreadable."""

    path: str  # relative to SRC
    status: str
    reason: str = ""
    found_by: str = ""
    n_faces: int = 0
    box: list[float] | None = None  # the part of the crop that shows the photo (faces/align.py photo_box)


@dataclass
class AlignSummary:
    results: list[AlignResult] = field(default_factory=list)
    redone: int = 0  # images processed in this call (the rest were finished by an earlier one)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def open_photo(path: str | os.PathLike) -> Image.Image:
    """Decode a photo (L or RGB); ValueError with a short reason if it is unusable."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"{w}x{h} pixels is too large (limit {MAX_IMAGE_PIXELS:,})")
            img.load()
            return upright(img).convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # Pillow raises many types on broken files (OSError, SyntaxError, struct.error...)
        text = str(e).strip().splitlines()
        raise ValueError(f"not a readable image ({text[0][:160] if text else type(e).__name__})") from None


def align_photo(image: Image.Image, opts: AlignOptions) -> tuple[Image.Image | None, AlignResult]:
    """One photo -> (aligned crop or None, its result without a path)."""
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        return None, AlignResult("", "no_face", f"image too small to hold a face ({w}x{h}; {MIN_SIDE} px a side at least)")
    faces = detect_faces(image)
    if faces:
        face = pick_face(faces, image.size, opts.pick)
        crop, box = cut_face(image, face, opts.template, opts.size, opts.margin)
        return crop, AlignResult("", "aligned", "", face.found_by, len(faces), box)
    if opts.undetected == "frame":
        face = landmarks_in_frame(image)
        crop, box = cut_face(image, face, opts.template, opts.size, opts.margin)
        return crop, AlignResult(
            "", "aligned_without_detection", "no face detected; landmarks placed in the whole frame (--undetected frame)",
            face.found_by, box=box)
    return None, AlignResult("", "no_face", "no face detected (HOG detector on padded, upsampled and rotated views, then CNN)")


def _save(image: Image.Image, path: Path) -> None:
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))


def _align_one(job: tuple[str, str, str, AlignOptions]) -> AlignResult:
    """Worker: read, align and write one image (atomically). Never raises for a bad image."""
    rel, src, dst, opts = job
    try:
        image = open_photo(src)
    except ValueError as e:
        return AlignResult(rel, "unreadable", str(e))
    except OSError as e:
        return AlignResult(rel, "unreadable", e.strerror or str(e))
    crop, result = align_photo(image, opts)
    if crop is not None:
        _save(crop, Path(dst))
    result.path = rel
    return result


def list_images(src: Path, skip: Path | None = None) -> list[str]:
    """Relative paths of SRC's images (any depth, hidden entries and ``skip`` left out), sorted."""
    found = []
    for folder, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or Path(folder, d).resolve() != skip))
        found += [os.path.relpath(os.path.join(folder, f), src) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _read_journal(path: Path, opts: AlignOptions) -> dict[str, AlignResult]:
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return {}
    done: dict[str, AlignResult] = {}
    try:
        theirs = {"template": "siamkit", **json.loads(lines[0])["options"]}  # journals from before --template
    except (ValueError, KeyError, TypeError):
        raise SiamkitError(f"{path} is not a journal of `siamkit align`; delete it to start DST over") from None
    if theirs != vars(opts):
        raise SiamkitError(
            f"{path.parent} was aligned with other options ({theirs}); rerun with the same options to finish it, "
            f"or pick a new DST")
    for line in lines[1:]:
        try:
            r = AlignResult(**json.loads(line))
        except (ValueError, TypeError):
            continue  # the last line of an interrupted run may be cut short: that image is simply redone
        done[r.path] = r
    return done


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, opts: AlignOptions = AlignOptions(),
                 workers: int | None = None, progress: bool = True, force: bool = False) -> AlignSummary:
    """Align every image under ``src`` into ``dst`` (same relative paths); see the module docstring.

    ``dst`` must neither hold ``src`` nor lie inside it; if it holds files but no earlier alignment, ``force`` is
    needed to write among them.
    """
    opts.check()
    check_installed()
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_dir():
        raise SiamkitError(f"{src} is not a folder; pass a folder of photos (one sub-folder per identity, or flat)")
    if dst_path.resolve() == src_path.resolve():
        raise SiamkitError(f"DST {dst} is SRC itself; pass another folder for the aligned crops")
    if src_path.resolve().is_relative_to(dst_path.resolve()):  # crops at DST/rel could land on SRC's own photos
        raise SiamkitError(f"DST {dst} holds SRC {src}; pass a folder outside it for the aligned crops")
    check_output_folder(dst_path, [src_path], force, own=(JOURNAL, REPORT), option="DST")
    rels = list_images(src_path, skip=dst_path.resolve())
    if not rels:
        raise SiamkitError(f"no images in {src} (formats: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    journal = dst_path / JOURNAL
    done = _read_journal(journal, opts)
    # A crop whose file is gone (deleted by hand) is redone; a no-face or unreadable verdict stands.
    wanted = set(rels)
    done = {p: r for p, r in done.items() if p in wanted and (not r.status.startswith("aligned") or (dst_path / p).is_file())}
    todo = [(rel, str(src_path / rel), str(dst_path / rel), opts) for rel in rels if rel not in done]
    dst_path.mkdir(parents=True, exist_ok=True)
    if not (journal.exists() and journal.stat().st_size):  # new, or created but cut before its header
        journal.write_text(json.dumps({"options": vars(opts)}) + "\n")
    summary = AlignSummary(results=list(done.values()))
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    bar = progress_bar(total=len(rels), initial=len(done), desc="align", unit="img", disable=not progress, dynamic_ncols=True)
    with open(journal, "a") as log:
        def record(result: AlignResult) -> None:
            log.write(json.dumps(vars(result)) + "\n")
            log.flush()  # a line per finished image: an interrupt loses at most the images in flight
            summary.results.append(result)
            summary.redone += 1
            bar.update()

        if workers == 1:
            for job in todo:
                record(_align_one(job))
        else:
            # spawn: a fresh interpreter per worker (forking a process that holds torch's threads can hang)
            with get_context("spawn").Pool(workers) as pool:
                for result in pool.imap_unordered(_align_one, todo, chunksize=8):
                    record(result)
    bar.close()
    write_report(dst_path, src_path, opts, summary)
    info(summary_line(summary, dst_path))
    return summary


def write_report(dst: Path, src: Path, opts: AlignOptions, summary: AlignSummary) -> None:
    by_status = {s: sorted(({"path": r.path, "reason": r.reason} for r in summary.results if r.status == s),
                           key=lambda d: d["path"])
                 for s in ("aligned_without_detection", "no_face", "unreadable")}
    aligned = [r for r in summary.results if r.status == "aligned"]
    atomic_write_json(dst / REPORT, {
        "siamkit_version": __version__,
        "source": str(src),
        "alignment": opts.alignment(median_box([r.box for r in aligned])),
        "options": vars(opts),
        "counts": {"images": len(summary.results), "aligned": len(aligned),
                   **{s: len(v) for s, v in by_status.items()}},
        "found_by": dict(Counter(r.found_by for r in aligned)),
        "several_faces": sorted(r.path for r in aligned if r.n_faces > 1),
        **by_status,
    })


def median_box(boxes: list[list[float] | None]) -> list[float] | None:
    """Each side's median over the detected faces' photo boxes: where, in a typical crop of this folder, the photo
    ended and its repeated edge pixels began (the whole crop for photos with room around the face)."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return [round(float(v), 2) for v in np.median(np.asarray(boxes, dtype=np.float64), axis=0)]


def summary_line(summary: AlignSummary, dst: Path) -> str:
    n = len(summary.results)
    return (f"aligned {summary.count('aligned'):,} of {n:,} images with a detected face, "
            f"{summary.count('aligned_without_detection'):,} aligned without a detection, "
            f"{summary.count('no_face'):,} skipped (no face), {summary.count('unreadable'):,} unreadable "
            f"({summary.redone:,} processed now) -> {dst} (reasons: {dst / REPORT})")


def read_alignment(folder: str | os.PathLike) -> dict | None:
    """The alignment (template, size, margin) of a folder written by `siamkit align`, or None for any other data."""
    path = Path(folder) / REPORT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["alignment"]
    except (ValueError, KeyError, TypeError, OSError):
        raise SiamkitError(f"{path} is not a report of `siamkit align`; realign the folder or remove the file") from None
