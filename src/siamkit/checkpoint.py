"""Checkpoints: complete, written atomically, and loaded without running any code from the file."""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .errors import SiamkitError
from .fileio import atomic_write

FORMAT = "siamkit-checkpoint-v1"
_FORMAT_PREFIX = "siamkit-checkpoint-v"
# torch names the first forbidden callable in its weights_only refusal: quote it to the user.
_FORBIDDEN_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save ``state`` (plus format and version tags) to ``path`` atomically.

    A failed write (full disk, lost permission) raises WriteError and leaves the previous file at ``path`` intact.
    """
    state = {"format": FORMAT, "siamkit_version": __version__, **state}
    # Serialised straight into the temporary file: no second copy of the whole state in memory.
    atomic_write(path, lambda f: torch.save(state, f), hint="the previous checkpoint there is intact (continue with --resume)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a siamkit checkpoint safely (weights_only: a malicious pickle cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise SiamkitError(f"checkpoint {path} does not exist; pass a run folder or a .pt file written by siamkit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols: the error below says it all
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(_FORMAT_PREFIX):
        raise SiamkitError(
            f"{path} is a PyTorch file but not a siamkit checkpoint (no '{FORMAT}' tag); pass a checkpoint that "
            f"siamkit train wrote (runs/NAME/checkpoints/last.pt or best.pt)"
        )
    if fmt != FORMAT:
        raise SiamkitError(
            f"{path} is a siamkit checkpoint in format {fmt!r} (written by siamkit "
            f"{state.get('siamkit_version', 'unknown')}); this siamkit {__version__} reads only {FORMAT!r}: "
            f"use the siamkit version that wrote it"
        )
    return state


def _unreadable(path: Path, error: Exception) -> SiamkitError:
    """Why torch.load refused ``path``, in one line: an export (not a checkpoint), code in the pickle, or damage."""
    exported = _exported_kind(path)
    if exported:
        return SiamkitError(
            f"{path} is {exported} (what siamkit export writes), not a checkpoint: pass the run it was exported from "
            f"(RUN or RUN/checkpoints/last.pt); verify, embed and identify also take an exported .onnx file as it is")
    forbidden = _FORBIDDEN_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if forbidden:
        return SiamkitError(
            f"refused to load {path}: unpickling it would call {forbidden.group(1)}, which is not tensor or "
            f"plain data; siamkit never runs code from a checkpoint, so use only checkpoints siamkit wrote")
    if isinstance(error, pickle.UnpicklingError):
        return SiamkitError(
            f"{path} is not a readable checkpoint (damaged, not a PyTorch file, or holding objects other than tensors "
            f"and plain data, which siamkit never unpickles); use a checkpoint siamkit wrote")
    # zip, EOF, key and value errors: torch reports damage in many ways
    return SiamkitError(
        f"{path} is not a readable checkpoint (truncated, damaged or not a PyTorch file: {type(error).__name__}); "
        f"use another checkpoint, e.g. checkpoints/step-N.pt, or retrain")


def _exported_kind(path: Path) -> str | None:
    """"an ONNX model" or "a TorchScript model" when ``path`` is one (by its name, or a TorchScript archive's code
    folder), else None."""
    if path.suffix.lower() == ".onnx":
        return "an ONNX model"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    # torch.jit.save's archive holds the model's Python code (NAME/code/...); torch.save's holds only data.pkl
    return "a TorchScript model" if any("/code/" in name for name in names) else None


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike) -> Path:
    """A run folder -> its best.pt (or last.pt); a file -> itself."""
    p = Path(run_or_checkpoint)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise SiamkitError(f"run folder {p} has no checkpoints/last.pt; train it first or pass a checkpoint file")
    if not p.exists():
        raise SiamkitError(f"{p} does not exist; pass a run folder (runs/NAME) or a checkpoint file")
    return p


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (runs/NAME for runs/NAME/checkpoints/x.pt)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def rng_state() -> dict[str, Any]:
    """Every random state a run draws from: Python, NumPy's global generator, torch (CPU and CUDA)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As a tensor and plain numbers: weights_only loading accepts no NumPy arrays.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` step-numbered checkpoints (step-*.pt); last.pt and best.pt stay."""
    numbered = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for old in numbered[:-keep] if keep > 0 else numbered:
        old.unlink(missing_ok=True)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temporary files a killed writer left behind (they are never read; they only fill the disk)."""
    for tmp in folder.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
