"""verifier.require_finite: no NaN or infinite embedding is ever written (embed), enrolled or scored (verify).

Issue 28 item 4: on main 935a11e a model whose embeddings overflowed scored "nan ... DIFFERENT", and embed and
enroll stored the NaN rows. Here the model's weights are finite (it loads) but so large that every embedding
overflows: the case the load-time check cannot catch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from siamkit.checkpoint import non_finite
from siamkit.errors import SiamkitError
from siamkit.verifier import require_finite
from test_cli_bad_input import assert_one_error, run_main
from tiny_run import load_raw, one_torch_thread, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny run's checkpoint with its first convolution's weights set to 3e38: finite, but any image overflows."""
    from siamkit.train.loop import train

    run = tmp_path_factory.mktemp("verifier") / "run"
    train(tiny_config(run, steps=1), progress=False)
    state = load_raw(run / "checkpoints" / "last.pt")
    first_conv = next(name for name, w in state["model"].items() if w.ndim == 4)
    state["model"][first_conv].fill_(3e38)  # every non-zero pixel overflows it; inf - inf downstream is NaN
    assert non_finite(state["model"]) == []
    path = run.parent / "overflowing.pt"
    torch.save(state, path)
    return path


@pytest.fixture
def faces(att_faces, tmp_path) -> Path:
    for person in ("s1", "s2"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(att_faces / person / f"{i}.pgm", tmp_path / "faces" / person / f"{i}.pgm")
    return tmp_path / "faces"


def test_require_finite_names_the_first_bad_image():
    emb = np.ones((4, 3), np.float32)
    assert require_finite(emb, list("abcd")) is emb
    emb[2, 1], emb[3, 0] = np.nan, np.inf
    with pytest.raises(SiamkitError, match=r"^the embedding of c is not finite \(NaN or infinity\) \(and of 1 other "
                                           r"image\(s\)\): the model overflows on it"):
        require_finite(emb, list("abcd"))


def test_a_non_finite_embedding_is_never_written_enrolled_or_scored(overflowing, faces, tmp_path, capfd):
    image = faces / "s1" / "1.pgm"
    code, err = run_main(["verify", overflowing, image, faces / "s2" / "1.pgm", "--threshold", "0.5"], capfd)
    assert_one_error(code, err, f"the embedding of {image} is not finite (NaN or infinity)")
    out = tmp_path / "e.npz"
    code, err = run_main(["embed", overflowing, "--data", faces, "--out", out, "--device", "cpu",
                          "--cache-dir", "none"], capfd)
    assert_one_error(code, err, f"the embedding of {image} is not finite (NaN or infinity) (and of 3 other image(s))")
    code, err = run_main(["enroll", overflowing, "--data", faces, "--out", tmp_path / "gallery", "--no-progress"],
                         capfd)
    assert_one_error(code, err, "is not finite (NaN or infinity)")
    assert not out.exists() and not (tmp_path / "gallery" / "gallery.npz").exists()
