"""Partial FC's head memory per process and step time against the full classifier, and the PK sampler's set-up at
2M identities.

For each class count (10k, 100k, 1M by default), 512-d rows, a batch of 64 rows per process:
- full: heads.py's CosFace over all C centres on one process, cross-entropy, the product's AdamW
  (train.step.build_optimizer, fused);
- partial FC (models/partial_fc.py) with --classifier-sample-rate R on 1, 2 and 4 processes (gloo on CPU,
  torch.multiprocessing), the same optimizer over each process's shard.
Each configuration runs in fresh processes, so that their peak RSS is their own. "head memory" is the bytes of the
head's weight, its gradient and the optimizer's state, read from the tensors' storages on each process (the
largest process's); "peak RSS" is the largest process's (it includes PyTorch itself, about 0.3 GB, and the
temporaries of a step); the step time is forward + backward + optimizer step of the head alone on random rows
(the backbone costs the same in both), the median of --steps - 1 steps after the first, the slowest process's.
All --steps steps run (--reference-steps for the full classifier and R = 1), so the 1M rows of R = 0.1 are
10-step runs of the head at 1M identities.

    python benchmarks/partial_fc.py                        # the table in benchmarks/results/partial_fc.md
    python benchmarks/partial_fc.py --classes 10000 --processes 1 2 --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: no spinning threads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from siamkit.config import TrainConfig  # noqa: E402
from siamkit.data.samplers import PKSampler  # noqa: E402
from siamkit.models.heads import build_classifier  # noqa: E402
from siamkit.models.partial_fc import PartialFC  # noqa: E402
from siamkit.train.step import build_optimizer  # noqa: E402

GB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                   help="class counts of the head table (none: the sampler's table alone)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="process counts for partial FC")
    p.add_argument("--rate", type=float, default=0.1, help="partial FC's --classifier-sample-rate")
    p.add_argument("--full-rate-processes", type=int, default=2,
                   help="also partial FC at R = 1 (sharding alone) on this many processes (0 = not)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="rows per process")
    p.add_argument("--steps", type=int, default=10, help="steps of each partial-FC configuration below R = 1")
    p.add_argument("--reference-steps", type=int, default=3,
                   help="steps of the full classifier and of R = 1, whose steps at 1M take minutes on 2 busy cores")
    p.add_argument("--sampler-identities", type=int, default=2_000_000, help="PK sampler set-up (0 = skip)")
    p.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    return p.parse_args(argv)


def head_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, their gradients and the optimizer's state, counted once per storage."""
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    torch.set_num_threads(1)  # 2-core machine shared by 1, 2 or 4 processes
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=5e-4)
    c, d, b = spec["classes"], spec["dim"], spec["batch"]
    if spec["kind"] == "full":
        head = build_classifier("cosface", d, c, 64.0, 0.4)
        loss_of = lambda x, y: F.cross_entropy(head(x, y), y)  # noqa: E731 - what JointLoss computes
    else:
        head = PartialFC("cosface", d, c, 64.0, 0.4, spec["rate"], seed=0, rank=rank, world=world)
        loss_of = head
    params = list(head.parameters())
    optimizer = build_optimizer(params, cfg)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(spec["steps"]):
        x = torch.randn(b, d, generator=g).requires_grad_(True)
        y = torch.randint(c, (b,), generator=g)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        if spec["kind"] != "full":
            head.step = step
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    result = {"head_bytes": head_bytes(params, optimizer), "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_s": statistics.median(times[1:] or times), "steps": len(times), "loss": float(loss.detach()),
              "sampled": getattr(head, "n_sampled", c), "rows": getattr(head, "rows", c)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_config(spec: dict, world: int) -> dict:
    """One configuration in ``world`` fresh processes; -> the largest process's numbers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, port, spec, out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {k: max(r[k] for r in ranks) for k in ("head_bytes", "rss_bytes", "step_s", "rows", "sampled")} | {
        "steps": ranks[0]["steps"], "loss": ranks[0]["loss"]}


def head_table(args: argparse.Namespace) -> list[str]:
    lines = ["| classes | head | processes | centres per process | sampled per step | head memory per process | "
             "vs full | peak RSS per process | step (s) | steps run |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for c in args.classes:
        base = {"classes": c, "dim": args.dim, "batch": args.batch, "steps": args.steps}
        configs = [("full", 1, {"kind": "full", "steps": args.reference_steps})]
        if args.full_rate_processes:
            configs.append(("partial FC, R = 1", args.full_rate_processes,
                            {"kind": "partial", "rate": 1.0, "steps": args.reference_steps}))
        configs += [(f"partial FC, R = {args.rate:g}", n, {"kind": "partial", "rate": args.rate}) for n in args.processes]
        full_bytes = None
        for name, world, spec in configs:
            r = run_config({**base, **spec}, world)
            full_bytes = full_bytes or r["head_bytes"]
            line = (f"| {c:,} | {name} | {world} | {r['rows']:,} | {r['sampled']:,} | {r['head_bytes'] / GB:.3f} GiB | "
                    f"{100 * r['head_bytes'] / full_bytes:.0f}% | {r['rss_bytes'] / GB:.2f} GiB | {r['step_s']:.3f} | "
                    f"{r['steps']} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def sampler_row(n_identities: int, order: str) -> str:
    """PKSampler over n identities x 2 images whose labels come sorted (as packed training sets store them) or
    shuffled: set-up time and memory (tracemalloc), and one batch's time."""
    labels = np.repeat(np.arange(n_identities, dtype=np.int64), 2)
    if order == "shuffled":
        labels = np.random.default_rng(0).permutation(labels)
    tracemalloc.start()
    start = time.perf_counter()
    sampler = PKSampler(labels, p=64, k=4, seed=0)
    setup = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    for step in range(20):
        sampler.batch(step)
    batch = (time.perf_counter() - start) / 20
    return (f"| {n_identities:,} | {len(labels):,} | {order} | {setup:.2f} | {held / 2**20:.0f} | {peak / 2**20:.0f} | "
            f"{1000 * batch:.2f} |")


def sampler_table(n_identities: int) -> list[str]:
    lines = ["| identities | images | labels | set-up (s) | memory held (MiB) | peak during set-up (MiB) | "
             "batch P=64 x K=4 (ms) |", "|---|---|---|---|---|---|---|"]
    lines += [sampler_row(n_identities, order) for order in ("sorted", "shuffled")]
    print("\n".join(lines), flush=True)
    return lines


def header() -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import describe_device

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return [f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
            f"- CPU: {describe_device('cpu')}",
            f"- load average at the start (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lines = header()
    print("\n".join(lines), flush=True)
    if args.classes:
        lines += ["", *head_table(args)]
    if args.sampler_identities:
        lines += ["", *sampler_table(args.sampler_identities)]
    lines.append(f"- load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
