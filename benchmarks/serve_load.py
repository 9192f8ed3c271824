"""Load on `siamkit serve`: requests/s and p50/p99 latency of POST /v1/verify at 1, 4, 16 and 64 concurrent clients,
with dynamic batching on (the server's defaults) and off (`--max-batch 1`); then identify's latency with 100,000
embeddings enrolled, beside 100 (the difference is the search's share; the rest is the probe's forward pass).

The load generator is an httpx + asyncio client in this process: each client sends its next request when the
last one is answered (a closed loop, as a program waiting on the answer does), for a fixed time per level after a
warm-up; latency is measured per request from send to answer. Every verify posts the same two AT&T photos
(s1/1.pgm, s1/2.pgm) as multipart files. A server is started per model and batching setting, on 127.0.0.1 and a
free port, with a fresh data directory, and stopped with SIGTERM.

For identify, 100,000 (and 100) synthetic unit vectors (one identity each, the model's dimension, seeded) are
enrolled into the gallery through the server's own store (siamkit.serve.store.SqliteStore in the data directory,
one enrolment per vector as the API makes them, with SQLite's fsync turned off for the fill) before the server
starts, so the server builds its live index from them as at any start; then one client identifies an AT&T photo
(top-5) repeatedly.

    PYTHONPATH=src siamkit train --out runs/att                       # the faces recipe's AT&T run (default settings)
    PYTHONPATH=src python benchmarks/serve_load.py runs/att dlib      # the table of results/serve.md
    PYTHONPATH=src python benchmarks/serve_load.py runs/att --clients 1 16 --seconds 3 --out -   # quick look

The client shares the CPU with the server (2 cores here): at 64 clients part of what is measured is the client. The
server runs its model on one OpenMP thread by default (--server-threads), leaving the other core to the client.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from _serve_helpers import Server  # noqa: E402  (the tests' server starter: one way to start and stop one)
from machine import REPO, data_root, describe_device  # noqa: E402

GALLERY = "bench"
TABLE_HEADER = "| model | batching | clients | requests | requests/s | p50 ms | p99 ms |"


SERVER_THREADS = 1  # set by --server-threads


@contextmanager
def serving(model: str, data_dir: Path, *options: str):
    """The base URL of a `siamkit serve` on 127.0.0.1 with SERVER_THREADS OpenMP threads (None: torch's default)."""
    server = Server(model, data_dir, *options, threads=SERVER_THREADS).start()
    try:
        yield server.url
    finally:
        server.stop()


async def closed_loop(client: httpx.AsyncClient, send, deadline: float, latencies: list[float], errors: list[str]):
    """One client: the next request as soon as the last one is answered, until the deadline."""
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        response = await send(client)
        if response.status_code != 200:
            errors.append(f"{response.status_code} {response.text[:200]}")
        latencies.append(time.perf_counter() - start)


async def measure(url: str, send, clients: int, seconds: float, warmup: float) -> dict:
    """requests/s, p50 and p99 (ms) of `clients` closed-loop clients over `seconds`, after `warmup` seconds."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        for phase_seconds, keep in ((warmup, False), (seconds, True)):
            latencies: list[float] = []
            errors: list[str] = []
            start = time.perf_counter()
            deadline = start + phase_seconds
            await asyncio.gather(*(closed_loop(client, send, deadline, latencies, errors) for _ in range(clients)))
            elapsed = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "rps": len(ms) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99))}


def verify_sender(photos: list[bytes]):
    files = [("image1", ("a.pgm", photos[0], "image/x-portable-graymap")),
             ("image2", ("b.pgm", photos[1], "image/x-portable-graymap"))]

    def send(client: httpx.AsyncClient):
        return client.post("/v1/verify", files=files)
    return send


def identify_sender(photo: bytes):
    def send(client: httpx.AsyncClient):
        return client.post(f"/v1/galleries/{GALLERY}/identify", params={"k": 5},
                           files=[("image", ("p.pgm", photo, "image/x-portable-graymap"))])
    return send


def verify_table(model: str, clients: list[int], seconds: float, warmup: float, photos: list[bytes]) -> list[dict]:
    rows = []
    for batching, extra in (("on", []), ("off", ["--max-batch", "1"])):
        with tempfile.TemporaryDirectory() as tmp, serving(model, Path(tmp) / "data", *extra) as url:
            for n in clients:
                result = asyncio.run(measure(url, verify_sender(photos), n, seconds, warmup))
                rows.append({"model": model, "batching": batching, "clients": n, **result})
                print(row_text(rows[-1]), flush=True)
    return rows


def fill_gallery(model: str, data_dir: Path, size: int) -> None:
    """`size` unit vectors, one identity each, written into the gallery through the server's SQLite store."""
    import siamkit
    from siamkit.gallery import model_probe
    from siamkit.serve.store import ModelStamp, SqliteStore, SQLITE_FILE

    verifier = siamkit.load(model)
    probe = np.asarray(model_probe(verifier), dtype=np.float32)  # the stamp the server computes at start
    stamp = ModelStamp(model, int(probe.shape[-1]), verifier.score_name, probe.tobytes())
    rng = np.random.default_rng(0)
    store = SqliteStore(data_dir / SQLITE_FILE)
    # Synthetic rows need no durability: without an fsync per enrolment 100k of them take seconds, not minutes.
    store.db.execute("PRAGMA synchronous=OFF")
    try:
        store.create_gallery(GALLERY, stamp)
        vectors = rng.standard_normal((size, stamp.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for i in range(size):  # one identity per vector, each its own enrolment (transaction), as the API makes them
            store.enroll(GALLERY, f"synthetic{i:06d}", vectors[i:i + 1], [f"synthetic {i}"])
    finally:
        store.close()


def identify_row(model: str, size: int, seconds: float, warmup: float, photo: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fill_gallery(model, Path(tmp) / "data", size)
        fill_s = time.perf_counter() - started
        with serving(model, Path(tmp) / "data") as url:
            result = asyncio.run(measure(url, identify_sender(photo), 1, seconds, warmup))
    row = {"model": model, "enrolled": size, "fill_s": fill_s, **result}
    print(f"identify at {size:,} enrolled ({model}): p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms, "
          f"{row['rps']:.1f} requests/s (filling the store took {fill_s:.0f} s)", flush=True)
    return row


def model_costs(model: str, photo: Path, threads: int | None) -> str:
    """Where a verify's time goes, in this process on the server's thread count: one image to the model's input
    (decoding, and for dlib finding and cutting the face chip: not batched), and the forward pass of 2 images (one
    verify) against 32 (a full batch), best of several."""
    import torch
    from PIL import Image

    import siamkit

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    verifier = siamkit.load(model)
    with Image.open(photo) as im:
        im.load()
        pixels = verifier.pixels(im)

        def best(work, reps: int) -> float:
            work()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
            return min(times) * 1000

        to_input = best(lambda: verifier.pixels(im), 10)
    two = best(lambda: verifier.embed_pixels(np.repeat(pixels[None], 2, 0)), 10)
    full = best(lambda: verifier.embed_pixels(np.repeat(pixels[None], 32, 0)), 3)
    torch.set_num_threads(before)
    return (f"- {model} ({torch.get_num_threads() if threads is None else threads} thread(s)): image -> model input "
            f"{to_input:.1f} ms; forward pass of 2 images {two:.1f} ms ({two / 2:.1f} ms/image), of 32 {full:.1f} ms "
            f"({full / 32:.1f} ms/image)")


def row_text(r: dict) -> str:
    return (f"| {r['model']} | {r['batching']} | {r['clients']} | {r['requests']:,} | {r['rps']:.1f} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} |")


def ratios(rows: list[dict], clients: int) -> list[str]:
    """Batching on / off requests/s per model at the given number of clients."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["batching"]: r["rps"] for r in rows if r["model"] == model and r["clients"] == clients}
        if {"on", "off"} <= by.keys():
            lines.append(f"- {model}: batching on / off at {clients} clients = {by['on'] / by['off']:.2f}x "
                         f"({by['on']:.1f} / {by['off']:.1f} requests/s)")
    return lines


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def report(args, rows: list[dict], ident: list[dict], costs: list[str], load_before: tuple, load_after: tuple) -> str:
    header = [TABLE_HEADER, "|---|---|---:|---:|---:|---:|---:|"]
    lines = [
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}",
        f"CPU: {describe_device('cpu')}",
        f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}",
        f"{args.seconds:g} s per level after {args.warmup:g} s of warm-up; server defaults except `--max-batch 1` "
        f"for batching off; server OpenMP threads: {args.server_threads or 'torch default'}",
        "", *header, *(row_text(r) for r in rows), "", *ratios(rows, 16), "",
        *(f"- identify (top-5) with {r['enrolled']:,} embeddings enrolled ({r['model']}): p50 {r['p50']:.1f} ms, "
          f"p99 {r['p99']:.1f} ms over {r['requests']} requests from 1 client" for r in ident),
        "", "Where a verify's time goes (in one process, no HTTP):", *costs,
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="runs or built-in model names to serve, e.g. runs/att dlib")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level (default: 8)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level (default: 2)")
    ap.add_argument("--identify-sizes", type=int, nargs="*", default=[100, 100_000],
                    help="embeddings enrolled for identify's latency, each a fresh gallery; none skips it "
                         "(default: 100 100000: the search's share is the difference)")
    ap.add_argument("--identify-model", default=None, help="model of the identify measurement (default: the first)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="OpenMP threads of the server; 0: torch's default, one per core (default: 1: on 2 cores "
                         "the other is the load generator's, and two OpenMP threads sharing a busy core spin-wait)")
    ap.add_argument("--costs-only", action="store_true", help="only the in-process cost lines, no server")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.md"),
                    help="markdown file for the results (replaced), or - for stdout only")
    args = ap.parse_args()
    global SERVER_THREADS
    SERVER_THREADS = args.server_threads or None
    att = data_root() / "att_faces"
    photos = [(att / "s1" / "1.pgm").read_bytes(), (att / "s1" / "2.pgm").read_bytes()]
    load_before = os.getloadavg()
    print(f"CPU: {describe_device('cpu')}; load average {load_before}", flush=True)
    costs = [model_costs(model, att / "s1" / "1.pgm", SERVER_THREADS) for model in args.models]
    print("\n".join(costs), flush=True)
    if args.costs_only:
        return 0
    print(TABLE_HEADER, flush=True)
    rows = [row for model in args.models
            for row in verify_table(model, args.clients, args.seconds, args.warmup, photos)]
    print("\n".join(ratios(rows, 16)))
    ident = []
    probe = (att / "s2" / "1.pgm").read_bytes()
    for size in args.identify_sizes:
        ident.append(identify_row(args.identify_model or args.models[0], size, args.seconds, args.warmup, probe))
    text = report(args, rows, ident, costs, load_before, os.getloadavg())
    if args.out != "-":
        command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(f"# Serving under load (benchmarks/serve_load.py)\n\n`{command}`\n\n{text}\n")
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
