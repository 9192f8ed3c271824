"""The torchrun command across machines of docs/guide/multi-gpu.md, with two "nodes" on this machine: two torchrun launches with
--nnodes 2 and a c10d rendezvous on localhost, one process each, training from each node's decoded cache (streamed)
and resuming."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from siamkit.checkpoint import load_checkpoint
from tiny_run import metrics_rows

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(data: Path, out: Path, caches: list[Path], steps: int, *extra: str) -> list[str]:
    """Both launches of one command; -> their stderr. Each node has its own cache folder, as separate machines do."""
    port = _free_port()
    procs = []
    for cache in caches:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "siamkit-test",
               "-m", "siamkit", "train", "--data", str(data), "--cache-dir", str(cache), "--data-in-memory", "no",
               "--recipe", "none", "--image-size", "32", "32", "--grayscale", "--device", "cpu",
               "--backbone", "mobilenet_v3_small", "--embedding-dim", "16", "--batch-size", "4",
               "--val-identities", "0", "--steps", str(steps), "--schedule", "constant", "--log-every", "1",
               "--checkpoint-every", "2", "--no-progress", "--out", str(out), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a two-node launch did not finish in 300 s")
        errs.append(err)
    assert [p.returncode for p in procs] == [0, 0], "\n-----\n".join(e[-3000:] for e in errs)
    return errs


def test_two_nodes_train_from_their_caches_and_resume(att_faces, tmp_path):
    out = tmp_path / "run"
    caches = [tmp_path / "node0_cache", tmp_path / "node1_cache"]
    errs = _two_nodes(att_faces, out, caches, 2)
    assert all(len([p for p in c.iterdir() if p.is_dir()]) == 1 for c in caches)  # each node decoded once
    assert sum("decoded 400 images into the cache" in e for e in errs) == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2

    errs = _two_nodes(att_faces, out, caches, 4, "--resume")
    assert not any("decoded 400 images" in e for e in errs)  # the second launch memory-maps the caches
    assert any("streamed from the decoded cache" in e for e in errs)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    rows = metrics_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)
