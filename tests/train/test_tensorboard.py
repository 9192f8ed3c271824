"""--tensorboard (train/tensorboard.py): event files hold the metrics.csv values, read back with tensorboard's reader."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_run import metrics_rows, one_torch_thread, tiny_config  # noqa: F401 (fixture)

pytest.importorskip("tensorboard", reason='--tensorboard needs the tensorboard extra: pip install -e ".[test]"')


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    from siamkit.train.loop import train

    out = tmp_path_factory.mktemp("tb") / "run"
    train(tiny_config(out, steps=4, val_identities=3, tensorboard=True), progress=False)
    return out


def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_hold_the_metrics_csv_values(tb_run):
    acc = events(tb_run)
    rows = metrics_rows(tb_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    from siamkit.train.logging import COLUMNS

    for key in COLUMNS[1:]:
        if all(r[key] == "" for r in rows):
            assert f"train/{key}" not in acc.Tags()["scalars"]  # an empty CSV column (e.g. no classification head)
            continue
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        # TensorBoard stores float32: the CSV's decimal value rounded to float32, exactly.
        assert got == [(int(r["step"]), float(np.float32(float(r[key])))) for r in rows if r[key] != ""], key
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(acc.Tags()["scalars"])


def test_held_out_metrics_roc_and_projector(tb_run):
    acc = events(tb_run)
    report = json.loads((tb_run / "eval" / "report.json").read_text())
    for key in ("roc_auc", "eer", "accuracy_mean", "threshold"):
        (event,) = acc.Scalars(f"held_out/{key}")
        assert event.step == 4 and event.value == float(np.float32(report[key]))
    for key, tar in report["tar_at_far"].items():
        assert acc.Scalars(f"held_out/tar_at_far_{key}")[0].value == float(np.float32(tar))
    (roc,) = acc.Images("held_out/roc")
    assert roc.step == 4 and roc.encoded_image_string.startswith(b"\x89PNG")
    # The projector: one row per held-out image, named by identity, with a sprite of thumbnails.
    folder = tb_run / "tensorboard" / "00004" / "held_out"
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    names = (folder / "metadata.tsv").read_text().split()
    assert tensors.shape[1] == 128 and len(names) == len(tensors) and (folder / "sprite.png").is_file()
    assert set(names) <= {str(d) for d in range(10)} and len(set(names)) == 3  # 3 held-out digits
    np.testing.assert_allclose(np.linalg.norm(tensors, axis=1), 1.0, atol=1e-4)  # l2 embeddings, printed to 4+ digits
    assert "held_out" in (tb_run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert (tb_run / "metrics.csv").is_file() and (tb_run / "loss.png").is_file()  # they stay
