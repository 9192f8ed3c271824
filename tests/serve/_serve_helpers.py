"""A real `siamkit serve` in a subprocess on 127.0.0.1 and a free port, for the tests under tests/serve/."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180  # torch import and model load on a busy 2-core machine; a bound, not a measurement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``siamkit serve MODEL ARGS`` on a free port; ``stop()`` sends SIGTERM and waits, ``start()`` starts again."""

    def __init__(self, model: str | Path, data_dir: Path, *args: str, log: Path | None = None, threads: int | None = 1):
        self.model, self.data_dir, self.args = str(model), Path(data_dir), list(args)
        self.threads = threads  # OpenMP threads of the server; None: torch's default (benchmarks/serve_load.py)
        self.log = log or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": str(self.threads)}
        if self.threads is None:
            del env["OMP_NUM_THREADS"]
        cmd = [sys.executable, "-m", "siamkit", "serve", self.model, "--port", str(self.port), "--data-dir",
               str(self.data_dir), *self.args]
        self.log_file = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"siamkit serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"siamkit serve did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit (SIGKILL only if it hangs past ``timeout``); returns the exit status."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self.log_file.close()
        return code

    def alive(self) -> bool:
        running = self.proc is not None and self.proc.poll() is None
        return running and httpx.get(self.url + "/healthz").status_code == 200

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def att_file(root: Path, person: int, image: int) -> Path:
    return root / f"s{person}" / f"{image}.pgm"


def files(**named: Path) -> list:
    """httpx multipart files from field=path pairs (a field given a list of paths repeats)."""
    out = []
    for field, paths in named.items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            out.append((field, (Path(path).name, Path(path).read_bytes(), "application/octet-stream")))
    return out


def one_line_error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    """The response is a 4xx/5xx JSON {"error": "one line"} of the expected status; returns the line."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"], body
    return body["error"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20000) -> bytes:
    """A real side x side greyscale PNG of zeros: 400 MB of pixels in about 400 kB (zlib, level 1)."""
    z = zlib.compressobj(1)
    row_block = bytes(side + 1) * 50  # 50 rows (filter byte + pixels) per call: few calls, little memory
    body = b"".join(z.compress(row_block) for _ in range(side // 50)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: only its header can be read."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
