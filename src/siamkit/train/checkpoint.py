"""Checkpoints: complete, written atomically, and loaded without running any code from the file."""
from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import SiamkitError
from ..fileio import atomic_write

FORMAT = "siamkit-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save ``state`` (plus format and version tags) to ``path`` atomically."""
    state = {"format": FORMAT, "siamkit_version": __version__, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a siamkit checkpoint safely (weights_only: a malicious pickle cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise SiamkitError(f"checkpoint {path} does not exist; pass a run folder or a .pt file written by siamkit")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SiamkitError(
            f"refused to load {path}: it holds objects other than tensors and plain data "
            f"({str(e).splitlines()[0][:160]}); siamkit never runs code from a checkpoint"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise SiamkitError(
            f"{path} is not a readable checkpoint (truncated or not a PyTorch file: {type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SiamkitError(f"{path} is a PyTorch file but not a siamkit checkpoint (format {FORMAT} expected)")
    return state


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
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` step-numbered checkpoints (step-*.pt); last.pt and best.pt stay."""
    numbered = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for old in numbered[:-keep] if keep > 0 else numbered:
        old.unlink(missing_ok=True)
