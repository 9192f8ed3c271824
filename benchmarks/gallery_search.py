"""1:N search speed: exact search (one matrix product) against faiss (exact flat index, and HNSW), on
synthetic 128-d galleries of 1k to 1M identities, for 1, 10 and 100 probes.

Uses siamkit's own indexes (gallery.ExactIndex, gallery.FaissIndex), cosine scores, top-5, one vector per
identity. Probes are noisy copies of random gallery vectors. Per gallery size: build time and memory of each
index (growth of the process's resident memory while building it, measured after the build), then per probe
count the best of several timed searches as queries per CPU-second (see qps); for HNSW also its recall@1 and @5 against
exact search (the fraction of exact top-k identities it returns).

    OMP_NUM_THREADS=1 python benchmarks/gallery_search.py                 # the table of results/gallery_search_cpu.md (one thread)
    python benchmarks/gallery_search.py --sizes 1000 10000 --out -        # quick look, table on stdout only

HNSW (M=32, efConstruction=40, efSearch=128) takes long to build on a few cores; --hnsw-max (default
100,000) skips it above that size.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from siamkit.gallery import ExactIndex, FaissIndex

REPO = Path(__file__).resolve().parents[1]
DIM, K = 128, 5


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def built(make):
    """(index, build CPU seconds, resident MiB it added)."""
    gc.collect()
    before = rss_mib()
    start = time.process_time()
    index = make()
    seconds = time.process_time() - start
    gc.collect()
    return index, seconds, rss_mib() - before


def qps(index, probes: np.ndarray, min_seconds: float = 0.3, max_reps: int = 20) -> tuple[float, tuple]:
    """Queries per CPU-second of the fastest of several searches (at least 3, or until min_seconds).

    CPU time of this process, not wall time: on a shared, oversubscribed machine wall time measures the
    neighbours; with OMP_NUM_THREADS=1 (numpy's BLAS and faiss on one thread) CPU time is the search's cost.
    """
    best, result, spent, reps = np.inf, None, 0.0, 0
    while reps < 3 or (spent < min_seconds and reps < max_reps):
        start = time.process_time()
        result = index.search(probes, K)
        t = time.process_time() - start
        best, spent, reps = min(best, t), spent + t, reps + 1
    return len(probes) / best, result


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx_ids, exact_ids)]))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--probes", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--hnsw-max", type=int, default=100_000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gallery_search_cpu.md"),
                    help="markdown file for the table, or - for stdout only")
    args = ap.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    header = (f"{cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, numpy {np.__version__}, "
              f"faiss {faiss.__version__}; {DIM}-d cosine, top-{K}, one vector per identity")
    rows = ["| identities | index | build CPU s | memory MiB | " + " | ".join(f"qps @{p}" for p in args.probes)
            + " | HNSW recall@1 / @5 (100 probes) |",
            "|---:|---|---:|---:|" + "---:|" * len(args.probes) + "---|"]
    print(header, flush=True)
    for n in args.sizes:
        gallery = rng.standard_normal((n, DIM), dtype=np.float32)
        owner = np.arange(n)
        picks = rng.integers(0, n, max(args.probes))
        probes = gallery[picks] + 0.5 * rng.standard_normal((len(picks), DIM), dtype=np.float32)
        kinds = [("exact (matrix product)", lambda: ExactIndex(gallery, owner, n, "cosine")),
                 ("faiss flat (exact)", lambda: FaissIndex(gallery, owner, n, "cosine"))]
        if n <= args.hnsw_max:
            kinds.append(("faiss HNSW", lambda: FaissIndex(gallery, owner, n, "cosine", hnsw=True)))
        exact_ids = None
        for name, make in kinds:
            index, seconds, mib = built(make)
            speeds, result = [], None
            for p in args.probes:
                speed, result = qps(index, probes[:p])
                speeds.append(speed)
            ids = result[0]
            if exact_ids is None:
                exact_ids = ids  # the first kind is exact search; the last probe count is the largest
            note = ""
            if "HNSW" in name:
                note = f"{recall(ids, exact_ids, 1):.3f} / {recall(ids, exact_ids, K):.3f}"
            elif name.startswith("faiss flat"):
                note = f"(same top-{K} as exact: {recall(ids, exact_ids, K):.3f})"
            row = (f"| {n:,} | {name} | {seconds:.2f} | {mib:.0f} | " + " | ".join(f"{s:,.0f}" for s in speeds)
                   + f" | {note} |")
            rows.append(row)
            print(row, flush=True)
            del index
            gc.collect()
        if n > args.hnsw_max:
            rows.append(f"| {n:,} | faiss HNSW | skipped (--hnsw-max {args.hnsw_max:,}) | |" + " |" * (len(args.probes) + 1))
    table = "\n".join([header, "", *rows])
    if args.out != "-":
        Path(args.out).write_text(
            "# 1:N search speed (benchmarks/gallery_search.py)\n\n"
            f"`OMP_NUM_THREADS={threads} python benchmarks/gallery_search.py {' '.join(sys.argv[1:])}`\n\n"
            + table + "\n")
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
