"""siamkit export (export.py): ONNX and TorchScript files that reproduce the PyTorch embeddings, with metadata."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import siamkit
from siamkit.errors import SiamkitError
from tiny_run import one_torch_thread, tiny_config  # noqa: F401 (fixture)

pytest.importorskip("onnxruntime", reason='the export tests need the export extra: pip install -e ".[test]"')

# The bound: the export reproduces the PyTorch embeddings to 1e-4 (float32 kernels may sum in another order).
PARITY = 1e-4


def held_out_paths(run, att_faces) -> list[str]:
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["n_genuine"] == 270  # 6 held-out people x C(10, 2)
    held_out = sorted(set(f"s{i}" for i in range(1, 31)) - set(ckpt["identities"]))
    return [str(att_faces / name / f"{i}.pgm") for name in held_out for i in range(1, 11)]


def test_onnx_reproduces_the_run_on_every_held_out_image_and_pair(trained_run, exported, att_faces):
    from siamkit.eval.verification import pair_scores

    onnx_file, out = exported
    # The command's own check: 60 held-out images, every pair decision of evaluate's pairs the same.
    assert "checked on 60 images" in out and "540 of 540 pair decisions the same" in out
    torch_v, onnx_v = siamkit.load(trained_run), siamkit.load(onnx_file)
    assert type(onnx_v).__name__ == "ExportedVerifier"
    paths = held_out_paths(trained_run, att_faces)
    a, b = torch_v.embed(paths), onnx_v.embed(paths)
    assert a.shape == b.shape == (60, 128) and np.abs(a - b).max() < PARITY
    # Every held-out pair (all 1770 of the 60 images) gets the same decision at the run's threshold.
    i, j = np.triu_indices(60, 1)
    t = torch_v.threshold
    assert onnx_v.threshold == t
    assert np.array_equal(pair_scores(a[i], a[j], "cosine") >= t, pair_scores(b[i], b[j], "cosine") >= t)


def test_onnx_metadata_holds_preprocessing_score_and_thresholds(trained_run, onnx_file):
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["siamkit"])
    v = siamkit.load(trained_run)
    assert meta["format"] == "siamkit-export-v1" and meta["score"] == "cosine"
    assert meta["preprocess"] == v.preprocess.to_dict()
    assert meta["calibration"]["threshold"] == v.threshold
    assert meta["calibration"]["thresholds_at_far"] == v.calibration["thresholds_at_far"]
    model = onnx.load(str(onnx_file))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # decoded pixels go straight in
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # a dynamic batch


def test_onnx_batch_is_dynamic(onnx_file):
    from siamkit.exported import onnx_session

    session = onnx_session(onnx_file)
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    one_by_one = np.concatenate([session.run(None, {"images": x[k:k + 1]})[0] for k in range(7)])
    together = session.run(None, {"images": x})[0]
    assert together.shape == (7, 128)
    np.testing.assert_allclose(together, one_by_one, atol=PARITY)


def test_torchscript_export_with_sidecar(trained_run, att_faces, tmp_path, capsys):
    import torch

    from siamkit.cli import main

    path = tmp_path / "model.pt"
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(path)]) == 0
    assert "540 of 540 pair decisions the same" in capsys.readouterr().out
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # the sidecar can check the file
    v = siamkit.load(trained_run)
    assert meta["calibration"]["threshold"] == v.threshold and meta["preprocess"] == v.preprocess.to_dict()
    module = torch.jit.load(str(path))
    paths = held_out_paths(trained_run, att_faces)[:8]
    pixels = torch.stack([v._to_uint8(p) for p in paths])
    assert np.abs(module(pixels).detach().numpy() - v.embed(paths)).max() < PARITY


def test_a_failed_parity_check_is_one_line_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys):
    from siamkit import export
    from siamkit.cli import main

    real = export._embed_exported
    monkeypatch.setattr(export, "_embed_exported", lambda *a, **k: real(*a, **k) + 2e-4)
    assert main(["export", str(trained_run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "differs from the PyTorch model by 2.00e-04 (limit 0.0001)" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_export_options(trained_run, tmp_path, capsys):
    from siamkit.cli import main

    assert main(["export", str(trained_run), "--out", str(tmp_path / "m.bin")]) == 2
    assert "an onnx export's file name ends in .onnx" in capsys.readouterr().err
    with pytest.raises(SiamkitError, match="unknown export format"):
        from siamkit.export import export_run

        export_run(trained_run, "tflite", tmp_path / "m", np.zeros((1, 3, 32, 32), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_a_run_evaluated_with_shifts_and_flips_exports_them_in_the_graph(trained_run, att_faces, tmp_path, capsys):
    """The views of --eval-flip --eval-shifts (10 per image) are part of the exported graph: the ONNX model
    reproduces the PyTorch Verifier's embeddings, which differ from one view's."""
    import shutil

    import torch

    from siamkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for path in (run / "checkpoints").glob("*.pt"):  # the same weights, as if trained with both switches on
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        ckpt["config"].update(eval_flip=True, eval_shifts=True)
        torch.save(ckpt, path)
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "checked on 60 images" in capsys.readouterr().out
    torch_v, onnx_v = siamkit.load(run), siamkit.load(tmp_path / "m.onnx")
    assert torch_v.flip and torch_v.shifts
    assert onnx_v.metadata["flip_in_graph"] and onnx_v.metadata["shifts_in_graph"]
    paths = held_out_paths(trained_run, att_faces)[:8]
    a, b = torch_v.embed(paths), onnx_v.embed(paths)
    assert np.abs(a - b).max() < PARITY
    one_view = siamkit.load(trained_run).embed(paths)
    assert np.abs(a - one_view).max() > 100 * PARITY
