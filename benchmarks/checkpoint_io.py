"""Checkpoint write time for ResNet18 with its Adam state, against one training epoch at the default settings.

Trains two epochs with siamkit's own training function (default settings: ResNet18 from scratch,
triplets, batch 32, Adam, 64x64 images for a folder, 20% of identities held out), takes the second
epoch's time from metrics.csv (the first includes warm-up), then rewrites the run's own last.pt (model,
Adam moments, scheduler, RNG states...) with ``save_checkpoint`` several times: serialising it
(``torch.save`` into memory) and writing it (temporary file, fsync, rename) are timed apart. On a GPU the
state is moved to the GPU first, so serialising includes the copy to host memory, as in training.

    python benchmarks/checkpoint_io.py                      # AT&T faces beside the repository, CPU
    python benchmarks/checkpoint_io.py --data digits --device cuda

Data: ../shared/data/att_faces beside the repository; override with --data or SIAMKIT_DATA.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# On a shared machine OpenMP threads that spin while waiting burn CPU without doing work; passive waiting
# keeps the epoch time a measure of the work. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from siamkit.config import TrainConfig  # noqa: E402
from siamkit.fileio import atomic_write  # noqa: E402
from siamkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from siamkit.train.loop import train  # noqa: E402


def default_data() -> str:
    from machine import data_root  # benchmarks/machine.py: the script's folder is on the path

    return str(data_root() / "att_faces")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=default_data(), help="folder of identity sub-folders, or digits")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=5, help="checkpoint writes timed (the median is reported)")
    p.add_argument("--out", default=None, help="folder for the run and the checkpoints (default: a temporary one)")
    return p.parse_args(argv)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="checkpoint_io_"))
    run_dir = work / "run"

    # Two epochs at the default settings; no checkpoint inside the timed loop.
    probe = TrainConfig(data=args.data, device=args.device)
    cfg = TrainConfig(data=args.data, device=args.device, epochs=2, log_every=1, checkpoint_every=10**9,
                      out=str(run_dir))
    t0 = time.perf_counter()
    train(cfg, overwrite=True, progress=False)
    run_s = time.perf_counter() - t0
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_epoch = len(rows) // 2
    epoch_s = float(rows[-1]["elapsed_s"]) - float(rows[per_epoch - 1]["elapsed_s"])
    step_s = epoch_s / per_epoch

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device.startswith("cuda") else "cpu")
    state = _to({k: v for k, v in state.items() if k not in ("format", "siamkit_version")}, device)
    target = work / "ckpt" / "last.pt"
    serialise, write, total = [], [], []
    for _ in range(args.repeats):
        _sync(device)
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save(state, buf)
        t1 = time.perf_counter()
        atomic_write(target, lambda f: f.write(buf.getbuffer()))
        t2 = time.perf_counter()
        save_checkpoint(target, state)  # the function training calls, end to end
        _sync(device)
        t3 = time.perf_counter()
        serialise.append(t1 - t)
        write.append(t2 - t1)
        total.append(t3 - t2)
    size_mb = target.stat().st_size / 1e6
    ckpt_s = statistics.median(total)

    n_params = sum(v.numel() for v in state["model"].values())
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"# Checkpoint write vs training epoch ({cfg.backbone}, Adam)\n")
    print(f"device: {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.data}; default settings: batch {probe.batch_size} triplets, image "
          f"{'x'.join(map(str, state['preprocess']['image_size']))}, val identities {probe.val_identities}; "
          f"{per_epoch} steps per epoch")
    print(f"checkpoint: {size_mb:.1f} MB ({n_params:,} model values + Adam moments), median of {args.repeats} writes")
    print()
    print("| what | seconds |")
    print("|---|---|")
    print(f"| serialise (torch.save into memory) | {statistics.median(serialise):.3f} |")
    print(f"| write (temporary file, fsync, rename) | {statistics.median(write):.3f} |")
    print(f"| save_checkpoint, end to end | {ckpt_s:.3f} |")
    print(f"| one training step | {step_s:.3f} |")
    print(f"| one training epoch ({per_epoch} steps, the second of two) | {epoch_s:.3f} |")
    print()
    print("| ratio | value |")
    print("|---|---|")
    print(f"| checkpoint / epoch | {ckpt_s / epoch_s:.1%} |")
    every = probe.checkpoint_every
    print(f"| checkpoint / {every} steps (the default --checkpoint-every) | {ckpt_s / (every * step_s):.2%} |")
    print(f"\n(whole run incl. data loading and held-out evaluation: {run_s:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
