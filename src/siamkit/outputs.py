"""What a command may write: siamkit replaces only what it made, and never what it reads.

- ``train --force`` (``--overwrite`` is the same flag) replaces a run folder only if siamkit made it: the folder
  holds siamkit's marker file (RUN_MARKER, written into every new run folder) or, for runs from before the marker,
  a config.json that siamkit wrote; and either way nothing but what a run writes (RUN_ENTRIES). Never the working
  directory, an input of the command, or a folder holding one.
- A command writing a file refuses an existing one unless given ``--force``, and never writes onto one of its own
  inputs, inside an input folder, or into a run's checkpoints/ folder, ``--force`` or not.

Each refusal is one SiamkitError line naming the path and what to do instead.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from ._version import __version__
from .errors import SiamkitError
from .fileio import atomic_write_json

RUN_MARKER = ".siamkit-run"
# Everything a run folder holds when siamkit alone wrote it (train, evaluate's default report, --calibrate).
RUN_ENTRIES = frozenset({RUN_MARKER, "config.json", "metrics.csv", "loss.png", "train.log", "checkpoints", "eval",
                         "tensorboard", "calibration.json", ".calibration.json.lock"})
CHECKPOINTS = "checkpoints"


def write_run_marker(run_dir: Path) -> None:
    """Mark ``run_dir`` as a run folder siamkit made (what --force checks before it removes one)."""
    atomic_write_json(run_dir / RUN_MARKER, {"siamkit_version": __version__,
                                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def is_run_folder(folder: Path) -> bool:
    """siamkit's marker is there, or (a run from before the marker) a config.json that siamkit wrote."""
    if (folder / RUN_MARKER).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "siamkit_version" in config


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # fileio.atomic_write's, left by a killed writer


def foreign_entries(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds besides what a run writes (also inside its checkpoints/: only .pt files)."""
    foreign = [p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not _is_temporary(p.name)]
    ckpts = run_dir / CHECKPOINTS
    if ckpts.is_dir():
        foreign += [f"{CHECKPOINTS}/{p.name}" for p in ckpts.iterdir()
                    if not (p.is_file() and p.suffix == ".pt") and not _is_temporary(p.name)]
    elif ckpts.exists():
        foreign.append(CHECKPOINTS)
    return sorted(foreign)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def existing_inputs(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs of a command that are files or folders on disk (a built-in data set's name is not)."""
    return [Path(p) for p in paths if p is not None and str(p) and Path(p).exists()]


def run_inputs(run: str | os.PathLike) -> list[Path]:
    """What a command reads of a run folder or checkpoint file: its checkpoints, config and calibration."""
    path = Path(run)
    if not path.is_dir():
        return existing_inputs([path])
    return existing_inputs([path / CHECKPOINTS, path / "config.json", path / "calibration.json"])


def check_replace_run(run_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse (one line) to remove ``run_dir`` for --force unless it is a run folder siamkit made, holding nothing
    else, and neither the working directory nor an input of the run nor a folder above one."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise SiamkitError(f"--force replaces only a run folder that siamkit made, and {run_dir} is "
                           f"{'a link' if run_dir.is_symlink() else 'a file'}; pass another --out")
    here = _resolved(run_dir)
    for kept in (Path.cwd(), *inputs):
        if _inside(_resolved(kept), here):
            what = "the working directory" if kept == Path.cwd() else f"the input {kept}"
            raise SiamkitError(f"--force would remove {run_dir}, which is or holds {what}; pass another --out")
    if not any(run_dir.iterdir()):
        return  # an empty folder: nothing to remove
    if not is_run_folder(run_dir):
        raise SiamkitError(f"--force replaces only a run folder that siamkit made, and {run_dir} is not one (no "
                           f"{RUN_MARKER} marker, no config.json of siamkit); pass another --out")
    foreign = foreign_entries(run_dir)
    if foreign:
        raise SiamkitError(f"--force would remove {run_dir}, which holds files that siamkit did not write ("
                           f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); move them out or pass "
                           f"another --out")


def check_not_input(out: Path, inputs: Iterable[Path], option: str = "--out") -> None:
    """Refuse an output that is an input, lies inside an input folder, or lies in a run's checkpoints/ folder."""
    here = _resolved(out)
    for folder in (here, *here.parents):  # the output itself may be a folder (align's DST, evaluate's --out)
        if folder.name == CHECKPOINTS and (is_run_folder(folder.parent) or any(folder.glob("*.pt"))):
            raise SiamkitError(f"{option} {out} lies in {folder}, a run's checkpoints folder, which holds only "
                               f"checkpoints that training writes; pass another {option}")
    for source in inputs:
        if _inside(here, _resolved(source)):
            where = "is" if here == _resolved(source) else "lies inside"
            raise SiamkitError(f"{option} {out} {where} {source}, an input of this command; siamkit never writes "
                               f"over what it reads: pass another {option}")


def check_output_file(out: str | os.PathLike, inputs: Iterable[Path], force: bool, option: str = "--out") -> None:
    """The checks of a file a command is about to write (see the module docstring)."""
    out = Path(out)
    check_not_input(out, list(inputs), option)
    if out.is_dir():
        raise SiamkitError(f"{option} {out} is a folder; pass a file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise SiamkitError(f"{option} {out} exists; pass --force to replace it, or another {option}")


def check_output_folder(out: Path, inputs: Iterable[Path], force: bool, own: Iterable[str], option: str) -> None:
    """The checks of a folder a command writes its files into: not an input, and if it exists and holds anything,
    then one of the files in ``own`` (an earlier output of the same command), unless --force."""
    check_not_input(out, list(inputs), option)
    if out.exists() and not out.is_dir():
        raise SiamkitError(f"{option} {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force and not any((out / name).exists() for name in own):
        raise SiamkitError(f"{option} {out} holds files that this command did not write; pass --force to write "
                           f"among them, or another {option}")


def check_report_files(folder: Path, names: Iterable[str], inputs: Iterable[Path], force: bool) -> None:
    """The checks of the files ``names`` a command is about to write into ``folder`` (evaluate's report)."""
    inputs = list(inputs)
    if folder.exists() and not folder.is_dir():
        raise SiamkitError(f"--out {folder} is a file; pass a folder for the report")
    for name in names:
        check_output_file(folder / name, inputs, force)
