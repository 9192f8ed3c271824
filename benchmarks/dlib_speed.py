"""Face descriptors per second: dlib's face ResNet in PyTorch (siamkit) against dlib's own compute_face_descriptor.

The same chips for both: face chips of AT&T photos (siamkit's detector and 5 landmarks, dlib's get_face_chip at
150 px), 32 by default. Each round times one pass over all the chips by every implementation, in turn (so that a
busy spell of the machine hits them all), and a figure is the median round (the fastest beside it):

- dlib: compute_face_descriptor(chip, num_jitters=0) per chip (batch 1), and on the list of chips (batch 32);
- PyTorch: DlibDescriptor (siamkit.models.dlib_resnet) on uint8 chips under torch.inference_mode, float32, at
  batch 32 and batch 1: contiguous memory, channels-last memory (siamkit's default on CPU), and channels-last
  traced, frozen and optimised for inference (torch.jit.freeze + optimize_for_inference: prepacked oneDNN weights).

Threads: dlib-bin is built without BLAS (dlib.DLIB_USE_BLAS) and computes a descriptor in the calling thread (the
measured CPU time / wall time says so), so the like-for-like comparison is PyTorch at 1 thread; PyTorch at more
threads is shown beside it. siamkit's CPU tuning (--cpu-tuning: Winograd and swapped-gradient kernels) applies to
training only (TunedConv2d runs PyTorch's kernel without gradients); --winograd times its Winograd forward against
PyTorch's on this network's 3x3 shapes, to say whether an inference path would gain from it.

On a machine shared with other work, OpenMP threads that spin at their barriers take the cores that the
descheduled ones need: run it also with OMP_WAIT_POLICY=PASSIVE (read when torch starts) to see that effect.

    PYTHONPATH=src python benchmarks/dlib_speed.py [--chips 32] [--threads 1 2] [--rounds 5] [--winograd]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from machine import data_root, describe_device  # noqa: E402  (benchmarks/machine.py)
from siamkit import winograd  # noqa: E402
from siamkit.models.dlib_resnet import DLIB_CHIP_SIZE, DlibDescriptor  # noqa: E402
from siamkit.models.dlib_weights import dlib_model_path, load_dlib_state_dict  # noqa: E402

DATA = data_root()


def face_chips(n: int) -> np.ndarray:
    """[n, 150, 150, 3] uint8 chips of the first photo of AT&T people s1, s2, ... (cycled past 40)."""
    import dlib
    from PIL import Image

    from siamkit.faces.detect import detect_faces

    chips = []
    for i in range(n):
        image = Image.open(DATA / "att_faces" / f"s{i % 40 + 1}" / f"{i // 40 % 10 + 1}.pgm")
        face = max(detect_faces(image), key=lambda f: f.area)
        points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
        shape = dlib.full_object_detection(dlib.rectangle(*(int(round(v)) for v in face.box)), points)
        chips.append(dlib.get_face_chip(np.asarray(image.convert("RGB")), shape, size=DLIB_CHIP_SIZE, padding=0.25))
    return np.stack(chips)


def dlib_passes(chips: np.ndarray) -> dict[tuple[str, int], Callable[[], None]]:
    import dlib

    model = dlib.face_recognition_model_v1(str(dlib_model_path()))
    listed = list(chips)
    return {
        ("dlib compute_face_descriptor", 1): lambda: [model.compute_face_descriptor(c, num_jitters=0) for c in listed],
        ("dlib compute_face_descriptor", len(chips)): lambda: model.compute_face_descriptor(listed, num_jitters=0),
    }


def torch_passes(chips: np.ndarray, batch_sizes: tuple[int, ...]) -> dict[tuple[str, int], Callable[[], None]]:
    state = load_dlib_state_dict()
    batch = torch.from_numpy(chips).permute(0, 3, 1, 2)  # a view of the numpy [N, H, W, 3]: channels-last memory
    plain = DlibDescriptor().eval()
    plain.load_state_dict(state)
    last = DlibDescriptor().eval().to(memory_format=torch.channels_last)
    last.load_state_dict(state)
    inputs = {"contiguous": batch.contiguous(), "channels_last": batch.contiguous(memory_format=torch.channels_last)}
    models = {"contiguous": plain, "channels_last": last}
    passes = {}
    for bs in batch_sizes:
        for layout in ("contiguous", "channels_last"):
            passes[(f"PyTorch eager, {layout.replace('_', '-')}", bs)] = _pass(models[layout], inputs[layout], bs)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            traced = torch.jit.trace(last, inputs["channels_last"][:bs])
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        passes[("PyTorch jit frozen, channels-last", bs)] = _pass(frozen, inputs["channels_last"], bs)
    return passes


def _pass(model: Callable, chips: torch.Tensor, batch_size: int) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            for i in range(0, len(chips), batch_size):
                model(chips[i:i + batch_size])
    return run


def measure(passes: dict, rounds: int) -> dict[tuple[str, int], tuple[float, float, float]]:
    """{row: (median seconds per pass, fastest, CPU seconds / wall seconds)} over interleaved rounds."""
    for run in passes.values():
        run()  # warm-up: oneDNN builds its kernels, the allocator its pools
    times: dict = {key: [] for key in passes}
    for _ in range(rounds):
        for key, run in passes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[key].append((wall, cpu / wall))
    return {k: (statistics.median(w for w, _ in v), min(w for w, _ in v), statistics.median(u for _, u in v))
            for k, v in times.items()}


def speed_table(n_chips: int, threads: list[int], rounds: int) -> list[str]:
    chips = face_chips(n_chips)
    lines = ["| threads | implementation | batch | chips/s (median) | fastest round | vs dlib, same batch | CPU/wall |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for t in threads:
        torch.set_num_threads(t)
        passes = {**dlib_passes(chips), **torch_passes(chips, (n_chips, 1))}
        result = measure(passes, rounds)
        for (name, bs), (median, fastest, use) in sorted(result.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
            dlib_median = result[("dlib compute_face_descriptor", bs)][0]
            lines.append(f"| {t} | {name} | {bs} | {n_chips / median:.1f} | {n_chips / fastest:.1f} "
                         f"| {dlib_median / median:.2f}x | {use:.2f} |")
    return lines


def winograd_table(batch: int, rounds: int) -> list[str]:
    """Forward of the network's 3x3 stride-1 convolutions: PyTorch (oneDNN) against siamkit's Winograd kernels."""
    lines = ["| shape (channels, map) | PyTorch ms | F(2x2,3x3) ms | F(4x4,3x3) ms | F(4x4) max abs diff |",
             "|---|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    for channels, side in ((32, 35), (64, 17), (128, 8), (256, 4)):
        x = torch.randn(batch, channels, side, side, generator=g).contiguous(memory_format=torch.channels_last) * 0.3
        w, b = torch.randn(channels, channels, 3, 3, generator=g) * 0.05, torch.randn(channels, generator=g) * 0.05
        calls = {"pytorch": lambda: F.conv2d(x, w, b, 1, 1),
                 "f2": lambda: winograd.conv3x3_winograd(x, w, b, winograd.F2),
                 "f4": lambda: winograd.conv3x3_winograd(x, w, b, winograd.F4)}
        with torch.inference_mode():
            ms = {k: v[0] * 1e3 for k, v in measure(calls, rounds).items()}
            diff = (calls["f4"]() - calls["pytorch"]()).abs().max().item()
        lines.append(f"| {channels}, {side}x{side} | {ms['pytorch']:.2f} | {ms['f2']:.2f} | {ms['f4']:.2f} "
                     f"| {diff:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=32, help="chips per pass, and the large batch size")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--winograd", action="store_true", help="also time siamkit's Winograd forward per shape")
    args = parser.parse_args()
    import dlib

    started = time.time()
    machine = describe_device("cpu").rsplit(", torch", 1)[0]  # the thread count is each row's own
    print(f"### dlib's face ResNet: descriptors per second ({machine})\n")
    print(f"torch {torch.__version__}, dlib {dlib.__version__} (DLIB_USE_BLAS={dlib.DLIB_USE_BLAS}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {args.chips} AT&T face chips per pass, "
          f"median of {args.rounds} interleaved rounds; {datetime.now():%Y-%m-%d %H:%M}; "
          f"load average before: {os.getloadavg()[0]:.1f}\n")
    print("\n".join(speed_table(args.chips, args.threads, args.rounds)))
    if args.winograd:
        torch.set_num_threads(args.threads[0])
        print(f"\nWinograd forward against PyTorch's, batch {args.chips}, channels-last, "
              f"{args.threads[0]} thread(s), median of {args.rounds}:\n")
        print("\n".join(winograd_table(args.chips, args.rounds)))
    print(f"\nTotal benchmark time {time.time() - started:.0f} s; load average after: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
