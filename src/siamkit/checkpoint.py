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
from .fileio import atomic_write, check_zip

FORMAT = "siamkit-checkpoint-v1"
_FORMAT_PREFIX = "siamkit-checkpoint-v"
# torch names the first forbidden callable in its weights_only refusal: quote it to the user.
_FORBIDDEN_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save ``state`` (plus format and version tags) to ``path`` atomically.

    A failed write (full disk, lost permission) raises WriteError and leaves the previous file at ``path`` intact.
    """
    state = {"format": FORMAT, "siamkit_version": __version__, **state}

    def write(f) -> None:
        # Serialised straight into the temporary file: no second copy of the whole state in memory. torch's zip
        # writer turns a failed write (a full disk) into a RuntimeError about positions; raise the OSError instead.
        recorder = _WriteErrors(f)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    atomic_write(path, write, hint="the previous checkpoint there is intact (continue with --resume)")


class _WriteErrors:
    """A file object that remembers the first OSError its writes raised."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def non_finite(weights: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or infinity."""
    return [name for name, t in weights.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a siamkit checkpoint safely (weights_only: a malicious pickle cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise SiamkitError(f"checkpoint {path} does not exist; pass a run folder or a .pt file written by siamkit")
    check_zip(path, "use another checkpoint, e.g. checkpoints/step-N.pt, or retrain")
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


def require_finite_model(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """``ckpt``, if its model's weights are all finite; else one line: a model with NaN weights embeds nothing."""
    bad = non_finite(ckpt.get("model") or {})
    if bad:
        raise SiamkitError(f"{path} holds weights that are not finite (NaN or infinity in {len(bad)} tensor(s), "
                           f"e.g. {bad[0]}): it cannot embed anything; use an earlier checkpoint, or retrain with a "
                           f"lower --lr")
    return ckpt


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
