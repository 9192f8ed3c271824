"""Small data with default settings: the hold-out and the PK batch shrink to fit the data, with one warning.

The faces recipe holds out 0.2 of the people and draws P = 16 people x K = 4 images per step: sized for data sets
of dozens of people. On a folder of a few people those defaults cannot work; rather than stop, the run takes the
largest hold-out and batch that fit, and says so once. Options given explicitly (a value other than the data's
default) are left as they are, and a value that does not fit still stops the run with its one-line error.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..config import TrainConfig
from ..data.sources import IdentityDataset, split_identities
from ..errors import SiamkitError, warn

# Held-out identities need at least this many people on each side: the report needs impostor pairs, and training
# needs two identities to tell apart.
MIN_PEOPLE = 2


def fit_to_data(cfg: TrainConfig, data: IdentityDataset, world: int = 1, say: bool = True) -> TrainConfig:
    """``cfg`` with a default --val-identities and default P x K shrunk to what ``data`` holds (one warning, when
    ``say``: on the main process)."""
    if data.n_identities < MIN_PEOPLE:  # nothing to fit: too small to train at all
        raise SiamkitError(f"--data {cfg.data} has {data.n_identities} identity; verification needs at least "
                           f"{MIN_PEOPLE} identities (one sub-folder per person)")
    changes, notes = _fit_hold_out(cfg, data.n_identities)
    cfg = replace(cfg, **changes)
    if cfg.pk_batches:
        train_ds, _ = split_identities(data, cfg.val_identities, cfg.seed)
        batch_changes, batch_notes = _fit_pk_batch(cfg, train_ds, world)
        cfg = replace(cfg, **batch_changes)
        notes += batch_notes
    if notes and say:
        warn(f"small data ({len(data)} images of {data.n_identities} identities): {'; '.join(notes)}")
    return cfg


def _is_default(cfg: TrainConfig, name: str) -> bool:
    """Whether an option holds the value a run on this data gets without it (the recipe's or TrainConfig's)."""
    value = getattr(cfg, name)
    return value in (getattr(TrainConfig(), name),
                     getattr(TrainConfig.for_data(cfg.data, pretrained=cfg.pretrained), name))


def _held_out(val_identities: float, n: int) -> int:
    """The number of identities --val-identities holds out of ``n`` (data/sources.py split_identities)."""
    if val_identities <= 0:
        return 0
    return int(val_identities) if val_identities >= 1 else max(1, round(val_identities * n))


def _fit_hold_out(cfg: TrainConfig, n: int) -> tuple[dict, list[str]]:
    n_val = _held_out(cfg.val_identities, n)
    if n_val == 0 or (n_val >= MIN_PEOPLE and n - n_val >= MIN_PEOPLE) or not _is_default(cfg, "val_identities"):
        return {}, []
    if n >= 2 * MIN_PEOPLE:
        return ({"val_identities": float(MIN_PEOPLE)},
                [f"{MIN_PEOPLE} of the {n} identities held out for the report and the threshold (--val-identities "
                 f"{cfg.val_identities:g} would hold out {n_val})"])
    return ({"val_identities": 0.0},
            [f"no identities held out (--val-identities 0): {n} are too few to hold out {MIN_PEOPLE} and train on "
             f"{MIN_PEOPLE}, so the run has no held-out report and no calibrated threshold"])


def _fit_pk_batch(cfg: TrainConfig, train_ds: IdentityDataset, world: int) -> tuple[dict, list[str]]:
    """P = at most the training identities with 2+ images per process; K = at most the images a P x K batch can take."""
    p, k = cfg.identities_per_batch, cfg.images_per_identity
    usable = int((np.bincount(train_ds.labels, minlength=train_ds.n_identities) >= 2).sum())
    if p * world > usable and _is_default(cfg, "identities_per_batch"):
        p = max(MIN_PEOPLE, usable // world)
    if p * world > usable:  # an explicit P too large, or too few people: the sampler's one-line error says so
        return {}, []
    if p * k * world > len(train_ds) and _is_default(cfg, "images_per_identity"):
        k = max(2, len(train_ds) // (p * world))
    if (p, k) == (cfg.identities_per_batch, cfg.images_per_identity):
        return {}, []
    per_process = f" per process ({world} processes)" if world > 1 else ""
    return ({"identities_per_batch": p, "images_per_identity": k},
            [f"PK batches of P={p} x K={k} images{per_process} instead of P={cfg.identities_per_batch} x "
             f"K={cfg.images_per_identity}"])
