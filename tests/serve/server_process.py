"""A real `siamkit serve` in a subprocess on a free port of 127.0.0.1, for the fault tests: started, waited for
(bounded), killed with SIGKILL or stopped with SIGTERM. Its output goes to a log file the failure message shows."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pg_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180  # loading torch and the model on a busy 2-core machine; the loop ends when it answers


class ServerProcess:
    def __init__(self, model: str | Path, log: Path, *store_args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "siamkit", "serve", str(model), "--port",
                                          str(self.port), *store_args], stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"siamkit serve exited ({self.proc.returncode}): {self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"siamkit serve did not answer within {START_TIMEOUT_S} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or the OOM killer would end it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> int:
        """SIGTERM: the graceful stop; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
