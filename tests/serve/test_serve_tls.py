"""TLS through uvicorn's certificate options: `siamkit serve --ssl-certfile --ssl-keyfile` answers over https (a
self-signed certificate made by openssl for 127.0.0.1), and the same port does not answer plain http."""
from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from _serve_helpers import REPO, START_TIMEOUT_S, att_file, files, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_serves_https_with_the_given_certificate(trained_run, certificate, att_faces, tmp_path):
    cert, key = certificate
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "siamkit", "serve", str(trained_run), "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--ssl-certfile", str(cert), "--ssl-keyfile",
                             str(key)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as c:
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the https server never became ready"
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = c.post("/v1/verify", files=files(image1=att_file(att_faces, 1, 1), image2=att_file(att_faces, 1, 2)))
            assert r.status_code == 200 and r.json()["decision"] in ("same", "different")
        with pytest.raises(httpx.TransportError):  # no plain http beside it
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).raise_for_status()
        assert "https://127.0.0.1" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def test_half_a_certificate_is_one_line(certificate, tmp_path):
    from conftest import run_cli

    done = run_cli("serve", "dlib", "--ssl-certfile", str(certificate[0]), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "siamkit: error: TLS needs both --ssl-certfile and --ssl-keyfile"]
