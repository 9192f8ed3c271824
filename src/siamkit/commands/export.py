"""`siamkit export`: the embedding network as ONNX or TorchScript, checked against PyTorch on the spot."""
from __future__ import annotations

import argparse

def run(args: argparse.Namespace) -> int:
    from ..api import open_run
    from ..export import check_export_out, check_images, export_run, same_decisions
    from ..outputs import existing_inputs, run_inputs

    check_export_out(args.format, args.out, [*run_inputs(args.run), *existing_inputs([args.data])], args.force)
    ckpt, run_dir = open_run(args.run)  # the checkpoint, read once; export_run builds the model from it
    ds, what = check_images(ckpt, args.data)
    result = export_run(args.run, args.format, args.out, ds.images, opened=(ckpt, run_dir))
    meta = result["metadata"]
    line = (f"{args.format} export -> {args.out}; checked on {len(ds)} images ({what}): max abs difference "
            f"{result['max_abs_diff']:.1e} (limit 1e-4)")
    if meta["calibration"] is not None:
        differ, n = same_decisions(ds, result["exported"], result["reference"], meta["score"],
                                   meta["calibration"]["threshold"])
        line += f"; {n - differ} of {n} pair decisions the same"
    print(line)
    return 0
