"""Small data with default settings trains: the hold-out and the PK batch shrink to fit, with one warning
(train/small_data.py); explicit options are left alone, and one person still stops with one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from siamkit.cli import main
from siamkit.config import TrainConfig
from siamkit.data.sources import IdentityDataset
from siamkit.errors import SiamkitError
from siamkit.train.small_data import fit_to_data
from tiny_run import one_torch_thread  # noqa: F401

SHORT = ["--steps", "2", "--cpu-tuning", "off", "--no-baseline-dlib", "--no-progress"]


def folder_of(att_faces, tmp_path, people: int, images: int):
    root = tmp_path / "faces"
    for person in range(1, people + 1):
        (root / f"s{person}").mkdir(parents=True)
        for i in range(1, images + 1):
            shutil.copy(att_faces / f"s{person}" / f"{i}.pgm", root / f"s{person}" / f"{i}.pgm")
    return root


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("siamkit: warning:")]


def test_24_images_of_3_people_train_with_one_warning(att_faces, tmp_path, capfd):
    data = folder_of(att_faces, tmp_path, people=3, images=8)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *SHORT]) == 0
    (warning,) = warnings_of(capfd.readouterr().err)
    # 3 people cannot give 2 held out and 2 to train on; 3 identities with 2+ images give P = 3, and 3 x 4 <= 24
    assert "small data (24 images of 3 identities)" in warning
    assert "no identities held out (--val-identities 0)" in warning
    assert "PK batches of P=3 x K=4 images instead of P=16 x K=4" in warning
    config = json.loads((run / "config.json").read_text())
    assert (config["val_identities"], config["identities_per_batch"], config["images_per_identity"]) == (0, 3, 4)
    assert (run / "checkpoints" / "last.pt").is_file()


def test_one_person_stops_with_one_line(att_faces, tmp_path, capfd):
    data = folder_of(att_faces, tmp_path, people=1, images=10)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *SHORT]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("siamkit:")]
    assert err[-1] == f"siamkit: error: --data {data} has 1 identity; verification needs at least 2 identities (one sub-folder per person)"
    assert not warnings_of("\n".join(err))
    assert not run.exists()


def dataset(counts: list[int]) -> IdentityDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    return IdentityDataset(images=torch.zeros((len(labels), 1, 8, 8), dtype=torch.uint8), labels=labels,
                           names=[f"p{i}" for i in range(len(counts))], paths=[str(i) for i in range(len(labels))])


def test_the_hold_out_shrinks_to_two_people_when_there_are_four_or_more(caplog):
    cfg = TrainConfig.for_data("faces/")  # the faces recipe: 0.2 held out, P = 16 x K = 4
    fitted = fit_to_data(cfg, dataset([6] * 5))  # 0.2 of 5 people = 1 held out: too few for a report
    # 2 held out leave 3 people of 6 images: P = 3, and 3 x 4 <= 18 images
    assert (fitted.val_identities, fitted.identities_per_batch, fitted.images_per_identity) == (2, 3, 4)
    assert len(caplog.records) == 1 and "2 of the 5 identities held out" in caplog.messages[0]


def test_k_shrinks_when_p_x_k_images_exceed_the_data():
    cfg = TrainConfig.for_data("faces/", val_identities=0)  # 0 given: nothing held out, nothing to fit there
    fitted = fit_to_data(cfg, dataset([2, 2, 3]))  # 7 images: P = 3, K = 7 // 3 = 2
    assert (fitted.val_identities, fitted.identities_per_batch, fitted.images_per_identity) == (0, 3, 2)


def test_p_is_per_process_under_torchrun():
    cfg = TrainConfig.for_data("faces/", val_identities=0)
    fitted = fit_to_data(cfg, dataset([4] * 9), world=2)  # 9 identities over 2 processes: P = 4 each
    assert (fitted.identities_per_batch, fitted.images_per_identity) == (4, 4)


def test_data_that_fits_and_explicit_options_are_left_alone(caplog):
    cfg = TrainConfig.for_data("att")
    assert fit_to_data(cfg, dataset([10] * 40)) == cfg  # the main job: 8 held out, 32 people for P = 16
    explicit = TrainConfig.for_data("faces/", identities_per_batch=8, val_identities=0)
    assert fit_to_data(explicit, dataset([8] * 3)) == explicit  # the sampler then says what is wrong
    assert not caplog.records
    from siamkit.train import distributed
    from siamkit.train.run import build_sampler

    with pytest.raises(SiamkitError, match="a PK batch of P=8 x K=4 images is larger than the 24 training images"):
        build_sampler(explicit, dataset([8] * 3), distributed.DistContext())
    with pytest.raises(SiamkitError, match="--val-identities 0.3 holds out 1 of 3 identities"):
        fit_to_data(TrainConfig.for_data("faces/", val_identities=0.3), dataset([8] * 3))
