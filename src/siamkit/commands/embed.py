"""`siamkit embed`: the embeddings of a data set in an .npz file (an exported .onnx model without torch)."""
from __future__ import annotations

import argparse
import os

from ..errors import SiamkitError
from .common import load_model_data, views


def run(args: argparse.Namespace) -> int:
    from ..exported import is_exported
    from ..outputs import check_output_file, existing_inputs, run_inputs

    if not args.out.endswith(".npz"):
        raise SiamkitError(f"--out {args.out} must end in .npz")
    check_output_file(args.out, [*run_inputs(args.run), *existing_inputs([args.data])], args.force)
    if is_exported(args.run):  # before anything imports torch
        return _exported(args)
    import io

    import numpy as np

    from ..api import load_model
    from ..data.transforms import Preprocess
    from ..eval.embed import embed_images
    from ..device import resolve_device
    from ..fileio import atomic_write_bytes
    from ..verifier import require_finite

    device = resolve_device(args.device)
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    ds = load_model_data(args, ckpt, pre)
    flip, shifts = views(args, ckpt)
    emb = embed_images(model, ds.images, pre, device, flip=flip, shifts=shifts)
    require_finite(emb, [os.path.join(ds.root, p) if ds.root else p for p in ds.paths])
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, labels=ds.labels, names=np.array(ds.names), paths=np.array(ds.paths))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(emb)} embeddings of dimension {emb.shape[1]} -> {args.out}")
    return 0


def _exported(args: argparse.Namespace) -> int:
    """embed with an exported .onnx model: onnxruntime, no torch; the views (flip, shifts) are the export's."""
    import io

    import numpy as np

    from ..exported import embed_folder, load_exported
    from ..fileio import atomic_write_bytes

    if args.flip is not None or args.shifts is not None:
        raise SiamkitError("an exported model mirrors and shifts images (or not) as its run did; drop --flip and "
                           "--shifts")
    out = embed_folder(load_exported(args.run), args.data)
    buf = io.BytesIO()
    np.savez(buf, embeddings=out["embeddings"], labels=out["labels"], names=np.array(out["names"]),
             paths=np.array(out["paths"]))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(out['embeddings'])} embeddings of dimension {out['embeddings'].shape[1]} -> {args.out}")
    return 0
