"""The application in-process (FastAPI's TestClient) around a small stand-in model: CORS only when asked, the
store's outage as 503, an unexpected failure as a one-line 500, JSON enrolment of base64 images."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from siamkit.data.pixels import Preprocess, image_to_array
from siamkit.serve.app import create_app
from siamkit.serve.batching import Batcher
from siamkit.serve.service import Service
from siamkit.serve.store import StoreUnavailable, open_store
from _serve_helpers import one_line_error


class MeanColourModel:
    """A stand-in verifier whose embedding is an image's mean RGB (enough to tell a red from a blue picture)."""

    preprocess = Preprocess(image_size=(16, 16))
    score_name = "cosine"
    calibration = {"source": "a test", "threshold": 0.99, "thresholds_at_far": {"1e-2": {"threshold": 0.999}}}
    threshold = 0.99
    align = False

    def pixels(self, image) -> np.ndarray:
        return image_to_array(image, self.preprocess)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if (pixels == 13).all():
            raise RuntimeError("a bug in the model")
        return pixels.reshape(len(pixels), 3, -1).mean(2).astype(np.float32) + 1.0

    def embed(self, images, align=None) -> np.ndarray:
        return self.embed_pixels(np.stack([self.pixels(Image.fromarray(np.asarray(i))) for i in images]))


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "PNG")
    return buf.getvalue()


def make_client(tmp_path, **options) -> TestClient:
    model = MeanColourModel()
    batcher = Batcher(model.embed_pixels, max_batch=4, max_wait_ms=1)
    service = Service(model, "mean-colour", open_store(tmp_path), batcher, 10**7)
    return TestClient(create_app(service, **options), raise_server_exceptions=False)


def test_cors_is_off_unless_asked(tmp_path):
    preflight = {"origin": "https://example.org", "access-control-request-method": "POST"}
    with make_client(tmp_path / "a") as c:
        r = c.options("/v1/verify", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with make_client(tmp_path / "b", cors=["https://example.org"]) as c:
        r = c.options("/v1/verify", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        r = c.options("/v1/verify", headers={**preflight, "origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_enrol_and_identify_with_base64_json(tmp_path):
    red, blue = base64.b64encode(png((250, 10, 10))).decode(), base64.b64encode(png((10, 10, 250))).decode()
    with make_client(tmp_path) as c:
        r = c.post("/v1/galleries/g/enroll", json={"identity": "red", "image": [red, red]})
        assert r.status_code == 200 and len(r.json()["image_ids"]) == 2
        c.post("/v1/galleries/g/enroll", json={"identity": "blue", "image": "data:image/png;base64," + blue})
        found = c.post("/v1/galleries/g/identify", json={"image": [blue, red], "top_k": 2}).json()["results"]
        assert [f["identity"] for f in found] == ["blue", "red"] and all(f["known"] for f in found)
        same = c.post("/v1/verify", json={"image1": red, "image2": red}).json()
        assert same["decision"] == "same" and same["score"] == pytest.approx(1.0, abs=1e-6)


def test_the_store_unreachable_is_503_and_a_bug_is_a_one_line_500(tmp_path, monkeypatch):
    with make_client(tmp_path) as c:
        grey = png((13, 13, 13))
        line = one_line_error(c.post("/v1/verify", files={"image1": ("a.png", grey), "image2": ("b.png", grey)}), 500)
        assert "RuntimeError" in line and "a bug in the model" not in line  # details stay in the server log
        from siamkit.serve import store as store_module

        def down(self):
            raise StoreUnavailable("connection refused")

        monkeypatch.setattr(store_module.SqliteStore, "galleries", down)
        r = c.get("/readyz")
        assert "unavailable" in one_line_error(r, 503) and r.headers["retry-after"] == "1"
        assert c.get("/healthz").status_code == 200  # the process is up; it is not ready


def test_unknown_paths_and_methods_are_one_line(tmp_path):
    with make_client(tmp_path) as c:
        assert "openapi.json" in one_line_error(c.get("/v2/verify"), 404)
        # FastAPI's /docs and /redoc would load their scripts from a CDN: the server offers neither
        one_line_error(c.get("/docs"), 404)
        one_line_error(c.get("/redoc"), 404)
        one_line_error(c.get("/v1/verify"), 405)


def test_the_page_loads_nothing_from_elsewhere():
    """The page's files name no other host: it works offline, and nothing a user uploads leaves the machine."""
    from importlib import resources

    for name in ("index.html", "app.js", "style.css"):
        text = resources.files("siamkit.serve").joinpath("page", name).read_text()
        assert re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I) is None, name
