"""A real `siamkit serve` for the tests (and benchmarks/serve_load.py): a subprocess on 127.0.0.1 and a free port,
stopped with SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300  # a ceiling: loading torch and a model (dlib) on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model: str | Path, data_dir: Path, *options: str, threads: int | None = 1):
    """Yields the base URL of `siamkit serve MODEL --data-dir DATA_DIR OPTIONS` once /readyz answers 200; the
    server runs on ``threads`` OpenMP threads (None: torch's default, one per core)."""
    port = free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "siamkit", "serve", str(model), "--host", "127.0.0.1",
                                 "--port", str(port), "--data-dir", str(data_dir), *options],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"siamkit serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"siamkit serve was not ready in {START_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
