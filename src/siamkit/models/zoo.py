"""Built-in models: a name (``dlib``) that stands wherever a run folder or checkpoint does.

An entry says which network it is, where its weights come from (read at run time from an installed package, never
shipped or downloaded), its preprocessing (input size, normalisation, the face chip it reads), its score and its
default threshold. ``checkpoint`` turns an entry into the dictionary a siamkit checkpoint holds, so that every
command that takes a run (api.open_run, the one place runs are resolved) takes a built-in model the same way.

Names and folders: a built-in name wins over a folder of the same name in the working directory, with a warning
that says how to reach the folder (``./dlib``), as built-in data sources do for ``--data att``.
Calibrations of a built-in model (``siamkit evaluate dlib --data FOLDER --calibrate``) live in its folder in
siamkit's cache: ``$SIAMKIT_CACHE_DIR/models/dlib/calibration.json`` (else ``$XDG_CACHE_HOME/siamkit/...``,
else ``~/.cache/siamkit/...``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..data.cache import default_cache_dir
from ..data.pixels import Preprocess
from ..errors import warn
from ..faces.chips import dlib_alignment
from .dlib_resnet import (DESCRIPTOR_SIZE, DLIB_CHIP_SIZE, DLIB_INPUT_SCALE, DLIB_MEAN_RGB,
                          DLIB_SAME_PERSON_DISTANCE, backbone_state)

if TYPE_CHECKING:  # siamese.py imports the backbones, which import dlib's weights: built when asked for
    from .siamese import SiameseNet


@dataclass(frozen=True)
class BuiltinModel:
    """A registry entry: everything a checkpoint would say about the model, and where its weights come from."""

    name: str
    spec: dict  # ModelSpec fields (models/siamese.py)
    preprocess: Preprocess
    alignment: dict  # the face chip it reads (faces/chips.py), as a run trained on aligned faces records it
    score: str
    threshold: float
    threshold_source: str  # what the default threshold is, printed by verify and identify
    weights: Callable[[], dict[str, torch.Tensor]]  # the SiameseNet state dict
    check_data: str  # the images `siamkit export` checks the export on when --data is not given
    origin: str  # one line: what it is and where it comes from

    @property
    def folder(self) -> Path:
        """Where its calibration (and evaluate's default report folder) live."""
        return default_cache_dir() / "models" / self.name


def dlib_preprocess() -> Preprocess:
    """dlib's input as siamkit's normalisation expresses it: (x / 255 - mean / 255) / (256 / 255) = (x - mean) / 256."""
    return Preprocess(image_size=(DLIB_CHIP_SIZE, DLIB_CHIP_SIZE), channels=3,
                      mean=tuple(m / 255.0 for m in DLIB_MEAN_RGB), std=(DLIB_INPUT_SCALE / 255.0,) * 3)


def _dlib_weights() -> dict[str, torch.Tensor]:
    """dlib's network as a SiameseNet state dict: the backbone, and dlib's 256 -> 128 layer as the embedding head."""
    from .dlib_weights import load_dlib_state_dict

    state = load_dlib_state_dict()
    fc = state["fc.weight"]
    out = {f"backbone.{k}": v for k, v in backbone_state(state).items()}
    out["embedding.fc.weight"] = fc
    out["embedding.fc.bias"] = torch.zeros(fc.shape[0], dtype=fc.dtype)  # dlib's layer has no bias
    return out


DLIB_THRESHOLD_SOURCE = (f"dlib's own rule: the same person below Euclidean distance {DLIB_SAME_PERSON_DISTANCE} "
                         f"(the score is minus the distance, so {-DLIB_SAME_PERSON_DISTANCE}); calibrate on your "
                         f"people with siamkit evaluate dlib --data FOLDER --calibrate")

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "dlib": BuiltinModel(
        name="dlib",
        spec={"backbone": "dlib-resnet29", "embedding_dim": DESCRIPTOR_SIZE, "embedding_activation": "none",
              "in_channels": 3, "n_classes": 0},
        preprocess=dlib_preprocess(),
        alignment=dlib_alignment(),
        score="euclidean",
        threshold=-DLIB_SAME_PERSON_DISTANCE,
        threshold_source=DLIB_THRESHOLD_SOURCE,
        weights=_dlib_weights,
        check_data="att-test",
        origin="dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1, public domain), weights read "
               "from the installed face-recognition-models package",
    ),
}


def builtin_model(run: str | os.PathLike) -> BuiltinModel | None:
    """The built-in model ``run`` names, or None for a path. The name wins over a folder or file of that name in the
    working directory, which ``./NAME`` reaches; saying so once when there is one."""
    if not isinstance(run, str) or run not in BUILTIN_MODELS:
        return None
    if Path(run).exists():
        _warn_shadowed(run)
    return BUILTIN_MODELS[run]


@lru_cache(maxsize=None)  # one warning per name and process
def _warn_shadowed(name: str) -> None:
    warn(f"{name!r} is siamkit's built-in {name} model; the {'folder' if Path(name).is_dir() else 'file'} "
         f"./{name} here is not used: pass ./{name} for it")


def checkpoint(model: BuiltinModel) -> dict:
    """The dictionary a siamkit checkpoint of this model would hold (what api.open_run returns for a run)."""
    return {
        "builtin": model.name,
        "model_spec": dict(model.spec),
        "model": model.weights(),
        "preprocess": model.preprocess.to_dict(),
        "score": model.score,
        "threshold": model.threshold,
        "threshold_source": model.threshold_source,
        "thresholds_at_far": {},
        "alignment": dict(model.alignment),
        "config": {"eval_flip": False, "eval_shifts": False},
        "check_data": model.check_data,
    }


def builtin_network(name: str) -> tuple["SiameseNet", dict]:
    """(the built-in model's network in eval mode, its checkpoint dictionary)."""
    from .siamese import network_of

    ckpt = checkpoint(BUILTIN_MODELS[name])
    return network_of(ckpt, f"built-in model {name}"), ckpt
