"""Export a run's embedding network (ONNX or TorchScript) with its preprocessing, score and thresholds.

The exported graph takes the decoded uint8 pixels [N, C, H, W] at the model's size (what
data/pixels.py makes of an image file: channels, centre crop, resize, done by Pillow outside the graph,
since ONNX's Resize does not reproduce Pillow's filter) and does the rest inside: scale to [0, 1],
mean/std, the embedding network in eval mode, the mirrored and shifted views' embeddings if the run adds them, and
the L2 normalisation. The batch dimension is dynamic. Everything a user needs besides the graph is
metadata: ONNX metadata_props (key "siamkit", a JSON object, with the file's own sha256 that loading checks), or a
JSON sidecar FILE.json beside a TorchScript file (with the sha256 of the TorchScript file). Before anything is
written, the exported model and the PyTorch model embed the same images (the run's held-out images, or --data)
and the export fails in one line if they differ by more than PARITY_TOLERANCE.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .calibration import run_calibration
from .data.pairs import folder_pairs
from .data.pixels import Preprocess
from .data.transforms import shift_pixels
from .data.sources import IdentityDataset, load_source, split_identities
from .errors import SiamkitError
from .eval.embed import embed_images, view_embedding
from .eval.verification import pair_scores
from .exported import EXPORT_FORMAT, HASH_PLACEHOLDER, hash_field
from .faces.chips import is_dlib_chip
from .fileio import atomic_write_bytes, atomic_write_json
from .outputs import check_output_file

FORMATS = ("onnx", "torchscript")
# The file names each format is written to: siamkit.load and verify recognise an ONNX file by its name.
EXTENSIONS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}
PARITY_TOLERANCE = 1e-4  # max abs difference of embeddings between the export and PyTorch (issue 16)
OPSET = 18


class PreprocessedEmbedder(torch.nn.Module):
    """uint8 images [N, C, H, W] at the model's size -> the embeddings siamkit's evaluation computes."""

    def __init__(self, model: torch.nn.Module, pre: Preprocess, flip: bool, shifts: bool = False):
        super().__init__()
        self.model, self.flip = model, flip
        self.shift = shift_pixels(pre.image_size) if shifts else 0
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same arithmetic as data/transforms.normalize and eval/embed._embed.
        x = (images.float() / 255.0 - self.mean) / self.std
        return view_embedding(self.model, x, self.flip, self.shift)


def export_metadata(ckpt: dict, pre: Preprocess, flip: bool, calibration: dict | None, shifts: bool = False) -> dict:
    """What a deployment needs besides the graph (stored in the file, or its sidecar)."""
    return {
        "format": EXPORT_FORMAT,
        "siamkit_version": __version__,
        "input": "uint8 [N, C, H, W]: decoded pixels, C = preprocess.channels, H x W = preprocess.image_size",
        "output": "float32 [N, D] embeddings",
        "preprocess": pre.to_dict(),
        # How the training faces were aligned (siamkit align: template, size, margin), None if they were not: a
        # deployment must align its photos the same way before the graph sees them.
        "alignment": ckpt.get("alignment"),
        "flip_in_graph": flip,
        "shifts_in_graph": shifts,  # four copies shifted by 1/16 of the side, averaged in (--eval-shifts)
        "score": ckpt.get("score", "cosine"),
        "calibration": calibration,
        "model_spec": ckpt.get("model_spec"),
        "trained_steps": ckpt.get("step"),
    }


def _onnx_bytes(wrapper: torch.nn.Module, example: torch.Tensor, metadata: dict) -> bytes:
    try:
        import onnx  # noqa: F401 (the exporter needs it)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SiamkitError('ONNX export needs onnx and onnxscript: pip install "siamkit[export]"') from None
    # torch's default (dynamo) exporter; it prints its progress on stdout and warns about internals.
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), None, input_names=["images"], output_names=["embeddings"], dynamo=True,
            opset_version=OPSET, dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    # The file's own sha256 goes into its metadata: hashed with a placeholder of the same length in its place,
    # then the placeholder replaced (exported.check_export_hash undoes that to check the file before use).
    entry.key, entry.value = "siamkit", json.dumps({**metadata, "sha256": HASH_PLACEHOLDER})
    data = proto.SerializeToString()
    return data.replace(hash_field(HASH_PLACEHOLDER), hash_field(hashlib.sha256(data).hexdigest()), 1)


def _torchscript_bytes(wrapper: torch.nn.Module, example: torch.Tensor) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; it still works
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _embed_exported(fmt: str, data: bytes, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    if fmt == "onnx":
        from .exported import onnx_session

        session = onnx_session(data)
        run = lambda x: session.run(None, {"images": x})[0]  # noqa: E731
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            module = torch.jit.load(io.BytesIO(data))
        run = lambda x: module(torch.from_numpy(x)).detach().numpy()  # noqa: E731
    return np.concatenate([run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def check_images(ckpt: dict, data: str | None) -> tuple[IdentityDataset, str]:
    """The images the export is checked on: ``data``'s, else the run's held-out identities (as training split them),
    else a built-in model's own check set; dlib's face chips of them for a model that reads those."""
    pre = Preprocess.from_dict(ckpt["preprocess"])
    load = _chip_loader(ckpt) or load_source
    if data is None and ckpt.get("check_data"):
        data = ckpt["check_data"]
    if data is not None:
        return load(data, pre), data
    cfg = ckpt.get("config", {})
    if not cfg.get("val_identities"):
        raise SiamkitError("this run held out no identities to check the export on; pass --data FOLDER")
    try:
        _, held_out = split_identities(load(cfg["data"], pre), cfg["val_identities"], cfg["seed"])
    except SiamkitError as e:
        raise SiamkitError(f"cannot load the run's data to check the export on ({e}); pass --data FOLDER") from None
    return held_out, f"the {held_out.n_identities} held-out identities of {cfg['data']}"


def _chip_loader(ckpt: dict):
    """For a model that reads dlib's face chips: --data -> its chips (faces/chip_data.py), decoded; else None."""
    if not is_dlib_chip(ckpt.get("alignment")):
        return None
    from .faces.chip_data import chip_folder

    return lambda data, pre: load_source(chip_folder(data), pre)


def same_decisions(ds: IdentityDataset, exported: np.ndarray, reference: np.ndarray, score: str, threshold: float,
                   seed: int = 0) -> tuple[int, int]:
    """(pairs whose decision differs between the two embeddings, pairs) over evaluate's pairs of ``ds``."""
    idx_a, idx_b, _, _ = folder_pairs(ds.labels, seed=seed)
    a = pair_scores(exported[idx_a], exported[idx_b], score) >= threshold
    b = pair_scores(reference[idx_a], reference[idx_b], score) >= threshold
    return int(np.count_nonzero(a != b)), len(idx_a)


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike, images: torch.Tensor,
               opened: tuple[dict, Path] | None = None) -> dict:
    """Export ``run`` to ``out`` after checking the export against PyTorch on ``images`` (uint8 [N, C, H, W]).

    ``opened``: ``api.open_run(run)``'s (checkpoint, run folder), when the caller has read them already.
    Returns {"max_abs_diff", "n_images", "metadata", "exported", "reference"} (the two [N, D] embeddings);
    raises SiamkitError (writing nothing) if the check fails.
    """
    from .api import open_run, run_flip, run_shifts
    from .models.siamese import network_of

    if fmt not in FORMATS:
        raise SiamkitError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt, run_dir = opened or open_run(run)
    model = network_of(ckpt, str(run))  # built once, here
    pre = Preprocess.from_dict(ckpt["preprocess"])
    if len(images) == 0:
        raise SiamkitError("no images to check the export on; pass --data FOLDER with images")
    flip, shifts = run_flip(ckpt), run_shifts(ckpt)
    metadata = export_metadata(ckpt, pre, flip, run_calibration(run_dir, ckpt), shifts)
    wrapper = PreprocessedEmbedder(model, pre, flip, shifts).eval()
    example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)
    data = _onnx_bytes(wrapper, example, metadata) if fmt == "onnx" else _torchscript_bytes(wrapper, example)
    exported = _embed_exported(fmt, data, images.numpy())
    reference = embed_images(model, images, pre, "cpu", flip=flip, shifts=shifts)
    diff = float(np.abs(exported - reference).max())
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise SiamkitError(f"the {fmt} export differs from the PyTorch model by {diff:.2e} (limit "
                           f"{PARITY_TOLERANCE:g}) on {len(images)} images; nothing written; try --format "
                           f"{'torchscript' if fmt == 'onnx' else 'onnx'}")
    out = Path(out)
    atomic_write_bytes(out, data)
    if fmt == "torchscript":
        atomic_write_json(sidecar_of(out), {**metadata, "sha256": hashlib.sha256(data).hexdigest()})
    return {"max_abs_diff": diff, "n_images": len(images), "metadata": metadata, "exported": exported,
            "reference": reference}


def check_export_out(fmt: str, out: str | os.PathLike, inputs: list[Path], force: bool) -> None:
    """Refuse (one line) an --out whose name does not say its format, and one that outputs.py would not write."""
    if fmt not in FORMATS:
        raise SiamkitError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not str(out).lower().endswith(EXTENSIONS[fmt]):
        raise SiamkitError(f"--out {out}: {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} export's file name ends in {' or '.join(EXTENSIONS[fmt])} (the "
                           f"name says what the file holds); pass --format {fmt} with such a name")
    check_output_file(out, inputs, force)
    if fmt == "torchscript":
        check_output_file(sidecar_of(out), inputs, force)


def sidecar_of(path: str | os.PathLike) -> Path:
    """model.pt -> model.pt.json: a TorchScript export's metadata."""
    return Path(str(path) + ".json")
