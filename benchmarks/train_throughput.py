"""Training throughput: the naive Siamese loop, siamkit's fused step and a peer, side by side.

ResNet18, triplet loss + a softmax identity classifier on every branch (W = 1), 32 triplets (96 images)
per step, at 64x64 and 112x112. Rows:

  1. naive loop: the backbone runs once per branch and per head (a, p, n x embedding, classifier):
     six passes, eager fp32, torch.optim.Adam with its defaults, NCHW -- the seed workflow;
  2. the same loop with one backbone pass per branch (three passes) feeding both heads;
  3. siamkit with its defaults: the real TrainStep (one pass over the concatenated branches) and the
     training loop's per-step work (normalise, step, finite check, optimizer, scheduler, loss logging),
     in a process whose CPU allocator is set as `siamkit train` sets it (accel.py keep_freed_memory);
  4. the same with --compile (torch.compile of the TrainStep); 5. with --amp bf16;
  6. pytorch-metric-learning's TripletMarginLoss with its BatchHardMiner on the 96 images, plus the
     same classifier, same backbone, data and batch size, in a plain loop (the `bench` extra).

Every row starts from the same uint8 images held in memory (synthetic, one seed) and draws the same
triplets with siamkit's TupleSampler; every row normalises its batch itself. Each row runs in its own
worker process (own peak memory, own compile caches); workers take turns, round after round (every
other round in reverse order), so a disturbance of the machine hits all rows alike; a row's images/s
is that of its fastest round.
Memory: on CPU the peak resident set of the worker minus its resident set before the model was built
(data and imports excluded); on CUDA torch.cuda.max_memory_allocated. MFU (``mfu``, the same on CPU and
CUDA): the direct-convolution FLOPs of one step (counted with torch.utils.flop_counter.FlopCounterMode on
the eager step and PyTorch's own convolution path: convolutions and matrix products as a direct
convolution does them, forward and backward, as executed -- row 1 executes its redundant passes) / the
step's time / the FLOP/s of a large dense matrix product of the row's compute dtype measured in the same
run (fp32; on CUDA with TF32 allowed, as cuDNN convolutions use it by default; for the bf16 rows bf16,
measured after the size's rounds, or fp32 where that is faster, as on CPUs without native bf16). Winograd
(--cpu-tuning) or cuDNN's fast algorithms do fewer multiplications than a direct convolution, so MFU can
read above 100%. The fp32 rate is sustained over a window of seconds like the rows' (2 s on CPU, 0.5 s on
CUDA) and measured right before the row's timed steps in every round (the machine's speed drifts, so a
reference from another minute would measure the machine rather than the row). Each round gets its own
MFU against its own reference; the table gives their median and range (the median, not the fastest
round's: the fastest round is often one whose reference was measured in a slow moment, which would read
high).

End to end: a real `siamkit train` run (same options: 64x64 or 112x112, W = 1, 32 triplets) on
the ROF-neutral faces (decoded, sampled, augmented on the fly), each of its steps timed from
metrics.csv (--log-every 1), against row 3's worker stepping right after (or before) it; --rounds pairs;
the fraction is the median of the pairs' ratios of median step times (see end_to_end_paired).

    PYTHONPATH=src python benchmarks/train_throughput.py                  # CPU, both sizes
    PYTHONPATH=src python benchmarks/train_throughput.py --device cuda    # see benchmarks/gpu.sh

Data for the end-to-end run: --data, or $SIAMKIT_DATA/rof_neutral, or ../shared/data/rof_neutral.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

ROWS = {
    "naive6": "1. naive loop: 6 passes (a/p/n x embedding/classifier)",
    "naive3": "2. naive loop: 3 passes (one per branch)",
    "siamkit": "3. siamkit (defaults: eager fp32)",
    "compile": "4. siamkit --compile",
    "bf16": "5. siamkit --amp bf16",
    "pml": "6. pytorch-metric-learning (BatchHardMiner + TripletMarginLoss)",
    # Not in the default table: the default minus one of its speed settings, to show what it buys.
    "nchw": "3b. siamkit --no-channels-last",
    "tuningoff": "3c. siamkit --cpu-tuning off",
    "sysalloc": "3d. siamkit, malloc left alone (--cpu-tuning auto without its allocator part)",
    "base": "3e. siamkit defaults at the --base-tree commit (its own row-3 code and src)",
    "nowinograd": "3f. siamkit, measure-and-pick without the Winograd candidates",
    # The GPU table (benchmarks/gpu.sh): baselines at the precision of the rows they are compared with.
    "naive6bf16": "1b. naive loop: 6 passes, bf16 autocast",
    "naive3bf16": "2b. naive loop: 3 passes, bf16 autocast",
    "bf16compile": "5b. siamkit --amp bf16 --compile",
    "cudagraphs": "5c. siamkit --amp bf16 --compile --compile-mode reduce-overhead (CUDA graphs)",
}
DEFAULT_ROWS = ["naive6", "naive3", "siamkit", "compile", "bf16", "pml"]
SIAMKIT_ROWS = ("siamkit", "compile", "bf16", "nchw", "tuningoff", "sysalloc", "nowinograd", "bf16compile", "cudagraphs")
BF16_ROWS = ("bf16", "bf16compile", "cudagraphs", "naive6bf16", "naive3bf16")  # MFU against the bf16 matmul rate
GPU_ROWS = ["naive6", "naive3", "siamkit", "naive6bf16", "bf16compile", "cudagraphs"]
BASE_TREE_ENV = "SIAMKIT_BENCH_BASE_TREE"  # --base-tree, read by the "base" row's worker process  # the rest are plain loops
TRIPLETS = 32  # per step; --triplets sets it (in every worker process too)
GPU_SHARE = 0.8  # --triplets max: the largest batch whose six-pass step peaks within this share of the card
N_IDENTITIES, PER_IDENTITY = 40, 10
MARGIN = 0.2


# ----------------------------------------------------------------------------------------------- workers


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Plain:
    """Rows 1, 2 and 6: torchvision ResNet18 + embedding and classifier layers, the way people write it."""

    def __init__(self, kind: str, data, device):
        import torch
        import torch.nn.functional as F
        import torchvision
        from torch import nn

        torch.manual_seed(0)
        self.backbone = torchvision.models.resnet18()
        self.backbone.fc = nn.Identity()
        self.embedding = nn.Linear(512, 128)
        self.classifier = nn.Linear(512, N_IDENTITIES)
        self.modules = nn.ModuleList([self.backbone, self.embedding, self.classifier]).to(device)
        self.optimizer = torch.optim.Adam(self.modules.parameters(), lr=1e-3)
        self.kind, self.data, self.F, self.torch = kind.removesuffix("bf16"), data, F, torch
        self.bf16 = kind.endswith("bf16")  # autocast, as people add mixed precision to such a loop
        if kind == "pml":
            from pytorch_metric_learning import losses, miners

            self.miner, self.pml_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=MARGIN)

    def _x(self, idx):
        x = self.data.images[idx].float()
        return (x / 255.0 - 0.5) / 0.5

    def forward(self, step: int):
        F = self.F
        idx = self.data.batch(step)  # [3, 32] on the device
        if self.kind == "pml":
            flat = idx.reshape(-1)
            y = self.data.labels[flat]
            features = self.backbone(self._x(flat))
            emb = F.normalize(self.embedding(features), dim=1)
            metric = self.pml_loss(emb, y, self.miner(emb, y))
            return metric + F.cross_entropy(self.classifier(features), y)
        xs = [self._x(i) for i in idx]
        ys = [self.data.labels[i] for i in idx]
        if self.kind == "naive6":  # each head runs the backbone again
            emb = [F.normalize(self.embedding(self.backbone(x)), dim=1) for x in xs]
            logits = [self.classifier(self.backbone(x)) for x in xs]
        else:
            features = [self.backbone(x) for x in xs]
            emb = [F.normalize(self.embedding(f), dim=1) for f in features]
            logits = [self.classifier(f) for f in features]
        metric = F.triplet_margin_loss(*emb, margin=MARGIN)
        return metric + sum(F.cross_entropy(lg, y) for lg, y in zip(logits, ys)) / 3

    def step(self, step: int) -> float:
        with self.torch.autocast(self.data.device.type, dtype=self.torch.bfloat16, enabled=self.bf16):
            loss = self.forward(step)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())  # the value everyone prints

    flop_step = step


class _Siamkit:
    """Rows 3-5: siamkit's own set-up (train.run.build_training) and step (train.step.optimisation_step).

    The product's code, not a copy: the same model, loss, optimizer, CPU tuning, cuDNN flags, finite check
    and BatchNorm rollback as `siamkit train`; only sampling and augmentation are the synthetic data's.
    """

    def __init__(self, kind: str, data, device, size: int):
        import torch

        from siamkit import accel
        from siamkit.config import TrainConfig
        from siamkit.data.transforms import Preprocess
        from siamkit.train.run import build_training

        if kind == "sysalloc":  # isolate the allocator's share (benchmarks/cpu_allocator.py); own process
            accel.keep_freed_memory = lambda: False
        if kind == "nowinograd":  # isolate Winograd's share; own process
            from siamkit import kernel_choice, winograd

            kernel_choice.KERNELS = tuple(k for k in kernel_choice.KERNELS if k not in winograd.SCHEMES)
            kernel_choice.cache_file = lambda cache_dir: None  # measure afresh: the cache has chosen among all
        torch.manual_seed(0)
        cfg = TrainConfig(
            image_size=[size, size], classification_weight=1.0, batch_size=TRIPLETS, schedule="constant",
            compile=kind in ("compile", "bf16compile", "cudagraphs"),
            compile_mode="reduce-overhead" if kind == "cudagraphs" else "default",
            amp="bf16" if kind in BF16_ROWS else "off", channels_last=kind != "nchw",
            cpu_tuning="off" if kind == "tuningoff" else "auto",
        )
        self.training = build_training(cfg, N_IDENTITIES, 3, device, total=10**9)
        self.training.model.train()
        if self.training.tuning_note:  # what --cpu-tuning auto picked (measured, or from the cache)
            print(f"  {size}x{size} {kind}: {self.training.tuning_note}", file=sys.stderr)
        self.pre = Preprocess((size, size))
        self.cfg, self.data = cfg, data

    def step(self, step: int) -> float:
        from siamkit.data.transforms import normalize
        from siamkit.train.step import optimisation_step

        idx = self.data.batch(step).reshape(-1)
        x = normalize(self.data.images[idx], self.pre, self.cfg.channels_last)
        out = optimisation_step(self.training, x, self.data.labels[idx]).out
        return sum(float(out[k].detach()) for k in ("loss", "metric", "classification") if k in out)

    def flop_step(self, step: int) -> float:
        """The step under FlopCounterMode (which counts eager ops), with the model's own FLOPs.

        siamkit's other convolution kernels (accel.py), where --cpu-tuning auto picked them, do other
        arithmetic than the model's (the swap computes a few unused outputs on some strided layers, Winograd
        fewer multiplications than the convolution); the count is the model's work, so it uses PyTorch's
        convolution path.
        """
        from siamkit.accel import TunedConv2d

        tuned = [m for m in self.training.model.modules() if type(m) is TunedConv2d]
        chosen, step_fn = [m.kernels for m in tuned], self.training.step_fn
        for m in tuned:
            m.kernels = {}
        self.training.step_fn = self.training.step_module
        try:
            return self.step(step)
        finally:
            for m, kernels in zip(tuned, chosen):
                m.kernels = kernels
            self.training.step_fn = step_fn


class _Data:
    """Synthetic uint8 images and labels on the device; the same triplets for every row."""

    def __init__(self, size: int, device):
        import numpy as np
        import torch

        from siamkit.data.samplers import TupleSampler

        g = torch.Generator().manual_seed(1234)
        # An epoch must hold a batch of anchors: large batches (--triplets max) get more images per identity.
        per_identity = max(PER_IDENTITY, -(-TRIPLETS // N_IDENTITIES))
        n = N_IDENTITIES * per_identity
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        labels = np.repeat(np.arange(N_IDENTITIES), per_identity)
        self.labels = torch.from_numpy(labels).to(device)
        self.sampler = TupleSampler(labels, 3, TRIPLETS, seed=0)
        self.device = device

    def batch(self, step: int):
        import torch

        return torch.from_numpy(self.sampler.batch(step)).to(self.device)


def _use_base_tree() -> None:
    """Import siamkit from the --base-tree checkout in this (worker) process: call before anything imports it."""
    base = Path(os.environ[BASE_TREE_ENV]).resolve()
    assert not any(m == "siamkit" or m.startswith("siamkit.") for m in sys.modules), "siamkit imported already"
    sys.path[:] = [str(base / "src"), str(base / "benchmarks")] + [p for p in sys.path if p != str(REPO / "src")]


def _base_tree_siamkit(data, device, size: int):
    """Row 3 as another commit builds it: that tree's src and its own benchmark's _Siamkit, in this process.

    For comparing two commits side by side in one run (--base-tree DIR, e.g. a `git worktree` of the old commit).
    """
    import importlib.util

    base = Path(os.environ[BASE_TREE_ENV]).resolve()
    spec = importlib.util.spec_from_file_location("base_train_throughput", base / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import siamkit

    assert Path(siamkit.__file__).resolve().is_relative_to(base), siamkit.__file__
    return module._Siamkit("siamkit", data, device, size)


def _worker(row: str, size: int, device_name: str, warmup: int, triplets: int, conn, release: bool = False) -> None:
    """One row in its own process; ``release``: hand the CUDA allocator's cached blocks back after the warm-up and
    after each run, so that rows whose batch fills the GPU (--triplets max) can take turns on it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    global TRIPLETS
    TRIPLETS = triplets  # a spawned process starts from the module's default

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if row == "base":
        _use_base_tree()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        data = _Data(size, device)
        sync()
        rss0 = _rss_bytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if row == "base":
            runner = _base_tree_siamkit(data, device, size)
        else:
            runner = _Siamkit(row, data, device, size) if row in SIAMKIT_ROWS else _Plain(row, data, device)
        step = 0
        for _ in range(warmup):
            runner.step(step)
            step += 1
        with FlopCounterMode(display=False) as counter:
            runner.flop_step(step)
        step += 1
        sync()
        if release:
            torch.cuda.empty_cache()
        conn.send(("ready", counter.get_total_flops()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "run":
                sync()
                t, cpu, faults = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(cmd[1]):
                    runner.step(step)
                    step += 1
                sync()
                elapsed = time.perf_counter() - t
                system_s = os.times().system - cpu.system
                conn.send(("time", elapsed, system_s, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
                if release:  # after the timing: the next run's first step allocates again (a few ms)
                    torch.cuda.empty_cache()
            elif cmd[0] == "memory":
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                else:
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
                conn.send(("memory", peak))
            else:
                return
    except Exception as e:  # report, don't hang the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _probe_triplets(size: int, device_name: str, candidates: list[int], conn) -> None:
    """The largest of ``candidates`` at which row 1 (six passes, fp32: the most memory of any row) still steps
    within GPU_SHARE of the card's memory: the other rows' processes keep their CUDA context, model, optimizer
    state and images on the card while one row runs."""
    import torch

    global TRIPLETS
    fits = 0
    total = torch.cuda.get_device_properties(torch.device(device_name)).total_memory
    for triplets in candidates:
        TRIPLETS = triplets
        try:
            torch.cuda.reset_peak_memory_stats()
            runner = _Plain("naive6", _Data(size, torch.device(device_name)), torch.device(device_name))
            runner.step(0)
            runner.step(1)  # the second step holds the optimizer state too
            torch.cuda.synchronize()
            if torch.cuda.max_memory_allocated() > GPU_SHARE * total:
                break
            fits = triplets
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            runner = None
            torch.cuda.empty_cache()
    conn.send(fits)


def largest_triplets(ctx, size: int, device: str, limit: int = 8192) -> int:
    """Triplets per step for --triplets max: powers of two from 32, probed in a process of their own."""
    candidates = [32 * 2**k for k in range(20) if 32 * 2**k <= limit]
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_probe_triplets, args=(size, device, candidates, child), daemon=True)
    proc.start()
    fits = parent.recv()
    proc.join()
    return fits


# ----------------------------------------------------------------------------------------------- parent


def mfu(step_flops: float, step_seconds: float, matmul_rate: float) -> float:
    """Model FLOPs utilisation, as every table of this script prints it: the direct-convolution FLOPs of one step /
    the step's time / the dense matmul rate (FLOP/s) measured in the same run.

    The FLOPs are counted by FlopCounterMode on PyTorch's own convolution path (as a direct convolution does them,
    forward and backward, whatever algorithm runs), so a row whose kernels do fewer multiplications (Winograd under
    --cpu-tuning, cuDNN's Winograd or FFT algorithms) can read above 100%.
    """
    return step_flops / step_seconds / matmul_rate


def matmul_flops(device, dtype, sizes, window_s: float) -> tuple[float, float]:
    """FLOP/s of square dense matrix products: (sustained over window_s, fastest single product).

    The rows are timed over windows of seconds (3 steps on CPU), so the reference is a rate sustained
    over seconds too. A single product lasts about 0.1 s on CPU, and the fastest of many such short
    samples lands on the machine's best moments (on this project's shared 2-core VM, 10-20% above the
    sustained rate); it is reported but not used for MFU.
    """
    import torch

    cuda = device.type == "cuda"
    sustained = burst = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while True:
            t = time.perf_counter()
            torch.mm(a, b)
            reps += 1
            if cuda:
                if reps % 20:
                    continue
                torch.cuda.synchronize()
            else:  # a CPU product is synchronous: time each one too
                burst = max(burst, 2 * n**3 / (time.perf_counter() - t))
            if time.perf_counter() - start >= window_s:  # one product can outlast it (bf16 on CPUs without bf16)
                break
        sustained = max(sustained, 2 * n**3 * reps / (time.perf_counter() - start))
    return sustained, max(burst, sustained)


class Worker:
    def __init__(self, ctx, row: str, size: int, device: str, warmup: int, release: bool = False):
        self.row, self.size = row, size
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(row, size, device, warmup, TRIPLETS, child, release), daemon=True)
        self.proc.start()
        self.flops = None
        self.error = None
        self.times: list[float] = []  # wall seconds of each run() call
        self.system: list[float] = []  # system CPU seconds of each (kernel work: page faults among others)
        self.faults: list[int] = []  # minor page faults of each
        self.references: list[float] = []

    def _recv(self):
        msg = self.conn.recv()
        if msg[0] == "error":
            self.error = msg[1]
        return msg

    def wait_ready(self) -> None:
        msg = self._recv()
        if msg[0] == "ready":
            self.flops = msg[1]

    def run(self, n: int, reference: float | None = None) -> None:
        """n timed steps; reference: the matmul FLOP/s measured just before (the round's MFU denominator)."""
        if self.error:
            return
        self.conn.send(("run", n))
        msg = self._recv()
        if msg[0] == "time":
            self.times.append(msg[1])
            self.system.append(msg[2])
            self.faults.append(msg[3])
            self.references.append(reference)

    def memory(self) -> float | None:
        if self.error:
            return None
        self.conn.send(("memory",))
        msg = self._recv()
        return msg[1] if msg[0] == "memory" else None

    def stop(self) -> None:
        if not self.error:
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


def end_to_end(data: Path, size: int, device: str, timed_steps: int, warmup_steps: int) -> dict:
    """Seconds of each step of a real `siamkit train` run after its warm-up, from its metrics.csv.

    --log-every 1: every row of metrics.csv times one step, from the end of the previous one, so data
    sampling, augmentation and the logging itself are inside it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "siamkit", "train", "--data", str(data), "--image-size", str(size), str(size),
            "--classification-weight", "1", "--batch-size", str(TRIPLETS), "--steps", str(warmup_steps + timed_steps),
            "--log-every", "1", "--val-identities", "0", "--no-progress", "--device", device, "--out", str(out),
            # row 3's model and batch (TrainConfig's defaults), not the faces recipe a folder of faces gets by
            # default (a smaller network on P x K batches of 64 images: another step, whose images/s this
            # comparison read as row 3's before 2026-11-30 12:40)
            "--recipe", "none",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        with open(out / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        images = 3 * TRIPLETS
        return {"steps": [images / float(r["images_per_s"]) for r in rows[warmup_steps:]], "command": " ".join(cmd[1:])}


def end_to_end_paired(row3: Worker, data: Path, size: int, device: str, steps: int, warmup: int, pairs: int) -> dict:
    """The real run's images/s as a fraction of row 3's, from pairs measured back to back.

    Each pair: a real run of steps x 3 timed steps and as many single steps of row 3's worker right
    after it (every other pair right before it); the pair's fraction is the ratio of the two median
    step times. This VM's speed drifts by 10-20% within a minute, so a fastest window of one run
    against a fastest round minutes (or even seconds) apart measures the machine; medians of steps
    taken back to back, over several pairs, do not.
    """
    def row3_steps() -> None:
        for _ in range(3 * steps):
            row3.run(1)

    fractions, real, synthetic, command = [], [], [], None
    for pair in range(pairs):
        first = len(row3.times)
        if pair % 2:  # every other pair row 3 goes first
            row3_steps()
        res = end_to_end(data, size, device, 3 * steps, warmup)
        if "error" in res:
            return res
        if pair % 2 == 0:
            row3_steps()
        if row3.error:
            return {"error": row3.error.splitlines()[-1]}
        e, s = statistics.median(res["steps"]), statistics.median(row3.times[first:])
        fractions.append(s / e)
        real.append(e)
        synthetic.append(s)
        command = res["command"]
    images = 3 * TRIPLETS
    return {
        "fraction": statistics.median(fractions), "fractions": fractions, "command": command,
        "real": images / statistics.median(real), "synthetic": images / statistics.median(synthetic),
    }


def cpu_pressure_total() -> float | None:
    """Microseconds that runnable tasks have waited for a CPU (Linux PSI), or None where unavailable."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def _fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    global TRIPLETS  # --triplets: read by the workers' arguments and the end-to-end run
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    p.add_argument("--rows", nargs="+", choices=[*ROWS, "gpu"], default=DEFAULT_ROWS,
                   help="rows to run; 'gpu': the GPU table's rows (" + " ".join(GPU_ROWS) + ")")
    p.add_argument("--triplets", default=str(TRIPLETS),
                   help="triplets per step (default 32), or 'max': the largest power of two from 32 at which row 1 "
                        "peaks within 80%% of GPU memory (probed first; CUDA only)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; every row runs --steps steps per round")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 3 on CPU, 25 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 10 on CUDA)")
    p.add_argument("--data", default=None, help="ROF-neutral folder for the end-to-end run")
    p.add_argument("--e2e-sizes", type=int, nargs="*", default=None, help="sizes of the end-to-end runs (default: --sizes)")
    p.add_argument("--base-tree", default=None, help="row 'base': a checkout of another commit to compare row 3 with")
    args = p.parse_args(argv)
    if "gpu" in args.rows:
        args.rows = GPU_ROWS
    if args.triplets != "max" and not (args.triplets.isdigit() and int(args.triplets) > 0):
        p.error(f"--triplets takes a positive count or 'max', got {args.triplets!r}")
    if args.triplets == "max" and args.device != "cuda":
        p.error("--triplets max probes GPU memory: use it with --device cuda")
    if "base" in args.rows:
        if not args.base_tree:
            p.error("--rows base needs --base-tree DIR (a checkout of the commit to compare with)")
        os.environ[BASE_TREE_ENV] = str(Path(args.base_tree).resolve())

    import torch

    from machine import describe_device

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    steps = args.steps or (25 if cuda else 3)
    warmup = args.warmup or (10 if cuda else 2)
    device = torch.device(args.device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 reference: what cuDNN convolutions use
    from machine import data_root

    data = Path(args.data) if args.data else data_root() / "rof_neutral"
    e2e_sizes = args.sizes if args.e2e_sizes is None else args.e2e_sizes

    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    if args.triplets == "max":
        TRIPLETS = min(largest_triplets(ctx, size, args.device) for size in args.sizes)
        print(f"  --triplets max: {TRIPLETS} triplets per step fit at every size (row 1, fp32)", file=sys.stderr)
        if TRIPLETS == 0:
            print("--triplets max: not even 32 triplets fit in GPU memory", file=sys.stderr)
            return 2
    else:
        TRIPLETS = int(args.triplets)
    # Workers build and warm up (torch.compile included) before any timing. On CUDA they do it at the same
    # time (compilation is CPU work on a many-core host), unless the batch was sized to fill the GPU's memory
    # (--triplets max): then, as on CPU (where warm-ups would fight over the cores), one after another, each
    # handing its cached memory back before the next starts and after each of its runs.
    together = cuda and args.triplets != "max"
    workers: dict[tuple[int, str], Worker] = {}
    for size in args.sizes:
        for row in args.rows:
            w = Worker(ctx, row, size, args.device, warmup, release=cuda and not together)
            workers[(size, row)] = w
            if not together:
                w.wait_ready()
                print(f"  ready: {size}x{size} {row}", file=sys.stderr)
    if together:
        for w in workers.values():
            w.wait_ready()
    # The MFU reference is measured right before each row's timed steps, every round: this VM's speed
    # drifts by 10-20% over minutes, and a row's FLOP/s must be divided by the machine's speed at the time.
    mm_bf16 = 0.0
    mm_seen: list[float] = []
    mm_burst = 0.0
    mm_sizes = (8192,) if cuda else (2048,)
    mm_window = 0.5 if cuda else 2.0
    results = {}
    e2e = {}
    waited, timed = 0.0, 0.0
    for size in args.sizes:
        for r in range(args.rounds):
            p0, t0 = cpu_pressure_total(), time.perf_counter()
            # Every other round in reverse order, so no row always runs right after another one.
            for row in args.rows if r % 2 == 0 else reversed(args.rows):
                sustained, burst = matmul_flops(device, torch.float32, mm_sizes, mm_window)
                mm_seen.append(sustained)
                mm_burst = max(mm_burst, burst)
                workers[(size, row)].run(steps, reference=sustained)
            p1 = cpu_pressure_total()
            if p0 is not None and p1 is not None:
                waited, timed = waited + (p1 - p0) / 1e6, timed + time.perf_counter() - t0
            print(f"  {size}x{size} round {r + 1}/{args.rounds} done", file=sys.stderr)
        if set(BF16_ROWS) & set(args.rows):
            mm_bf16 = max(mm_bf16, matmul_flops(device, torch.bfloat16, mm_sizes, mm_window)[0])
        for row in args.rows:
            w = workers[(size, row)]
            best = min(range(len(w.times)), key=w.times.__getitem__) if w.times else None
            results[(size, row)] = {
                "images_per_s": steps * 3 * TRIPLETS / w.times[best] if w.times else None,
                # (seconds, matmul FLOP/s measured just before) of every round: the MFU is per round
                "rounds": list(zip(w.times, w.references)),
                "memory": w.memory(),
                "flops": w.flops,
                "error": w.error,
            }
        if size in e2e_sizes:
            if not data.is_dir():
                e2e[size] = {"error": f"no data at {data}"}
            elif (size, "siamkit") not in workers:
                e2e[size] = {"error": "needs row 3 (--rows siamkit) to compare with"}
            else:
                print(f"  {size}x{size} end-to-end siamkit train on {data}", file=sys.stderr)
                e2e[size] = end_to_end_paired(workers[(size, "siamkit")], data, size, args.device, steps, warmup, args.rounds)
        for row in args.rows:
            workers[(size, row)].stop()

    # ------------------------------------------------------------------------------------------- table
    print(f"\n### Training throughput ({args.device}: {describe_device('cuda' if cuda else 'cpu')})\n")
    print(
        f"torch {torch.__version__}; ResNet18, triplet loss + softmax classifier (W=1), {TRIPLETS} triplets "
        f"({3 * TRIPLETS} images) per step; fastest of {args.rounds} interleaved rounds of {steps} steps after "
        f"{warmup} warm-up steps. MFU = direct-convolution FLOPs of the step (GFLOP/step: convolutions and matrix "
        f"products as a direct convolution does them, forward and backward, counted on PyTorch's own path whatever "
        f"algorithm runs) / step time / the dense matmul rate measured in this run: for fp32 rows the fp32 rate"
        f"{' (TF32 allowed)' if cuda else ''} measured over {mm_window:g} s right before the same round's steps, "
        f"for bf16 rows the bf16 rate measured after the rounds (or the fp32 one where faster); Winograd or "
        f"cuDNN's fast algorithms do fewer multiplications, so it can read above 100%; the median over rounds and "
        f"the range (fp32 matmul over the run: {min(mm_seen, default=0) / 1e9:,.1f}-"
        f"{max(mm_seen, default=0) / 1e9:,.1f} GFLOP/s; fastest single product: {mm_burst / 1e9:,.1f})"
        + (f"; bf16 matmul: {mm_bf16 / 1e9:,.1f} GFLOP/s" if mm_bf16 else "")
        + f"; {datetime.now():%Y-%m-%d %H:%M}."
        + (
            f" CPU pressure during the timed rounds (share of time some task waited for a core, "
            f"/proc/pressure/cpu): {waited / timed:.0%}." if timed else ""
        )
        + "\n"
    )
    print("| size | row | images/s | × row 1 | peak memory | GFLOP/step "
          "| MFU (step FLOP/s ÷ matmul rate): median of rounds (range) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        base = results.get((size, "naive6"), {}).get("images_per_s")
        for row in args.rows:
            res = results[(size, row)]
            if res["error"]:
                print(f"| {size}x{size} | {ROWS[row]} | failed: {res['error'].splitlines()[0][:120]} | | | | |")
                continue
            ips = res["images_per_s"]
            ratio = f"{ips / base:.2f}" if base else "-"
            # CPUs without native bf16 run bf16 matmuls far slower than fp32: measure against the faster one.
            mfus = [mfu(res["flops"], t / steps, max(mm_bf16, ref) if row in BF16_ROWS else ref)
                    for t, ref in res["rounds"]]
            mfu_text = f"{statistics.median(mfus):.0%} ({min(mfus):.0%}-{max(mfus):.0%})"
            print(
                f"| {size}x{size} | {ROWS[row]} | {ips:,.1f} | {ratio} | {_fmt_mem(res['memory'])} "
                f"| {res['flops'] / 1e9:,.1f} | {mfu_text} |"
            )
    if e2e:
        print("\nEnd to end: `siamkit train` on ROF-neutral (decoding excluded; sampling, augmentation, logging included):\n")
        print(
            f"| size | e2e images/s (median step) | row 3 images/s (median step, beside it) "
            f"| fraction (median of {args.rounds} pairs) | each pair |"
        )
        print("|---|---:|---:|---:|---|")
        for size, res in e2e.items():
            if "error" in res:
                print(f"| {size}x{size} | failed: {res['error'][:120]} | | | |")
                continue
            each = ", ".join(f"{f:.0%}" for f in res["fractions"])
            print(f"| {size}x{size} | {res['real']:,.1f} | {res['synthetic']:,.1f} | {res['fraction']:.0%} | {each} |")
        some = next((r for r in e2e.values() if "command" in r), None)
        if some:
            print(f"\nEnd-to-end command (per size): `{some['command']}`")
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
