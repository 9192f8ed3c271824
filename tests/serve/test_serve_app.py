"""Every operation of a real `siamkit serve` over HTTP, its decisions against `siamkit verify` / `identify` on the
same AT&T images, and galleries that survive a restart (SIGTERM, then a new server on the same --data-dir)."""
from __future__ import annotations

import base64
import contextlib
import io
import signal

import numpy as np
import pytest

from siamkit.cli import main
from _serve_helpers import Server, att_file, files, one_line_error

# Scores of the server and of the command line differ only by float32 rounding: the server embeds images in
# batches, the command line one at a time, and convolutions sum in another order (relative error ~1e-6 per
# layer). Cosine scores of unit vectors are then equal to well within 1e-4.
SCORE_TOL = 1e-4
GALLERY_PEOPLE = (31, 32, 33, 34)  # held out from the tiny run's training people (s1-s30)
UNKNOWN_PERSON = 35


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    s = Server(trained_run, tmp_path_factory.mktemp("serve_app") / "data").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cli_gallery(trained_run, att_faces, tmp_path_factory):
    """`siamkit enroll` of images 1-3 of GALLERY_PEOPLE: (gallery folder, the enrolled folder)."""
    folder = tmp_path_factory.mktemp("enroll_src")
    for person in GALLERY_PEOPLE:
        (folder / f"s{person}").mkdir()
        for image in (1, 2, 3):
            (folder / f"s{person}" / f"{image}.pgm").symlink_to(att_file(att_faces, person, image))
    out = tmp_path_factory.mktemp("cli_gallery")
    assert main(["enroll", str(trained_run), "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    return out


def cli_verify(run, a, b) -> tuple[float, float, str]:
    """(score, threshold, SAME/DIFFERENT) as `siamkit verify RUN A B` prints them (4 decimals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["verify", str(run), str(a), str(b)]) == 0
    words = out.getvalue().split()
    return float(words[1]), float(words[3]), words[4]


def test_health_ready_and_openapi(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        paths = c.get("/openapi.json").json()["paths"]
        for path in ("/v1/verify", "/v1/embed", "/v1/galleries/{gallery}/enroll", "/v1/galleries/{gallery}/identify",
                     "/v1/galleries/{gallery}/images/{image_id}", "/v1/galleries/{gallery}/identities/{identity}",
                     "/v1/galleries", "/v1/galleries/{gallery}/identities"):
            assert path in paths, path
        assert "multipart/form-data" in paths["/v1/verify"]["post"]["requestBody"]["content"]
        assert c.get("/").status_code == 200


def test_verify_equals_the_command_line(server, trained_run, att_faces):
    pairs = [((1, 1), (1, 2)), ((1, 1), (2, 1)), ((31, 1), (31, 4)), ((31, 1), (36, 2)), ((5, 3), (5, 9)),
             ((7, 2), (12, 2))]
    compared = 0
    with server.client() as c:
        for a, b in pairs:
            pa, pb = att_file(att_faces, *a), att_file(att_faces, *b)
            got = c.post("/v1/verify", files=files(image1=pa, image2=pb)).json()
            score, threshold, decision = cli_verify(trained_run, pa, pb)
            assert got["score"] == pytest.approx(score, abs=SCORE_TOL)  # (the CLI prints 4 decimals)
            assert got["threshold"] == pytest.approx(threshold, abs=1e-4)
            assert "calibrated on" in got["source"]
            if abs(got["score"] - got["threshold"]) > SCORE_TOL:  # a decision float rounding cannot flip
                assert got["decision"] == decision.lower()
                compared += 1
    assert compared >= 4
    assert {"same", "different"} >= {got["decision"]}


def test_verify_takes_base64_json_and_a_calibrated_far(server, att_faces):
    a, b = att_file(att_faces, 2, 1), att_file(att_faces, 2, 5)
    body = {"image1": base64.b64encode(a.read_bytes()).decode(), "image2": base64.b64encode(b.read_bytes()).decode()}
    with server.client() as c:
        multipart = c.post("/v1/verify", files=files(image1=a, image2=b)).json()
        as_json = c.post("/v1/verify", json=body).json()
        assert as_json["score"] == pytest.approx(multipart["score"], abs=SCORE_TOL)
        at_far = c.post("/v1/verify", json={**body, "far": 0.01}).json()
        assert "FAR 1e-2" in at_far["source"] and at_far["threshold"] != multipart["threshold"]
        line = one_line_error(c.post("/v1/verify", json={**body, "far": 0.05}), 400)
        assert "1e-1, 1e-2, 1e-3" in line


def test_embed_equals_the_python_api(server, trained_run, att_faces):
    import siamkit

    paths = [att_file(att_faces, 3, 1), att_file(att_faces, 4, 1)]
    with server.client() as c:
        got = c.post("/v1/embed", files=files(image=paths)).json()
    expected = siamkit.load(trained_run).embed([str(p) for p in paths])
    assert got["dim"] == expected.shape[1]
    np.testing.assert_allclose(np.array(got["embeddings"]), expected, atol=SCORE_TOL)  # float32 rounding, as above


def enroll_like_cli(client, gallery: str, att_faces) -> None:
    for person in GALLERY_PEOPLE:
        images = [att_file(att_faces, person, i) for i in (1, 2, 3)]
        r = client.post(f"/v1/galleries/{gallery}/enroll", data={"identity": f"s{person}"}, files=files(image=images))
        assert r.status_code == 200, r.text
        assert len(r.json()["image_ids"]) == 3


def test_identify_equals_the_command_line(server, trained_run, att_faces, cli_gallery):
    import siamkit
    from siamkit.gallery import load_gallery

    probes = [att_file(att_faces, p, i) for p in (*GALLERY_PEOPLE, UNKNOWN_PERSON) for i in (6, 9)]
    expected = siamkit.load(trained_run).identify([str(p) for p in probes], load_gallery(cli_gallery), k=3)
    with server.client() as c:
        enroll_like_cli(c, "same", att_faces)
        got = c.post("/v1/galleries/same/identify", data={"top_k": "3"}, files=files(image=probes)).json()
    assert len(got["results"]) == len(probes)
    threshold = got["threshold"]
    compared = 0
    for mine, theirs in zip(got["results"], expected):
        assert [t["identity"] for t in mine["top_k"]][:1] == [theirs["top_k"][0][0]]
        np.testing.assert_allclose([t["score"] for t in mine["top_k"]], [s for _, s in theirs["top_k"]],
                                   atol=SCORE_TOL)
        if abs(mine["score"] - threshold) > SCORE_TOL:
            assert mine["identity"] == (theirs["identity"] or "unknown")
            assert mine["known"] == (theirs["identity"] is not None)
            compared += 1
    assert compared >= len(probes) // 2


def test_listing_and_deleting(server, att_faces):
    with server.client() as c:
        ids = c.post("/v1/galleries/del/enroll", data={"identity": "ann"},
                     files=files(image=[att_file(att_faces, 37, 1), att_file(att_faces, 37, 2)])).json()["image_ids"]
        c.post("/v1/galleries/del/enroll", data={"identity": "bob"}, files=files(image=att_file(att_faces, 38, 1)))
        assert "del" in c.get("/v1/galleries").json()["galleries"]
        listed = c.get("/v1/galleries/del/identities").json()["identities"]
        assert listed == [{"identity": "ann", "images": 2}, {"identity": "bob", "images": 1}]
        assert c.delete(f"/v1/galleries/del/images/{ids[0]}").json()["deleted_images"] == 1
        one_line_error(c.delete(f"/v1/galleries/del/images/{ids[0]}"), 404)
        assert c.get("/v1/galleries/del/identities").json()["identities"][0] == {"identity": "ann", "images": 1}
        assert c.delete("/v1/galleries/del/identities/ann").json()["deleted_images"] == 1
        assert c.get("/v1/galleries/del/identities").json()["identities"] == [{"identity": "bob", "images": 1}]
        # the search sees the deletions at once: only bob is left to be found
        found = c.post("/v1/galleries/del/identify", files=files(image=att_file(att_faces, 37, 3))).json()
        assert [t["identity"] for t in found["results"][0]["top_k"]] == ["bob"]


def test_galleries_survive_a_restart(server, att_faces):
    probe = files(image=att_file(att_faces, 39, 5))
    with server.client() as c:
        c.post("/v1/galleries/keep/enroll", data={"identity": "s39"},
               files=files(image=[att_file(att_faces, 39, i) for i in (1, 2)]))
        c.post("/v1/galleries/keep/enroll", data={"identity": "s40"}, files=files(image=att_file(att_faces, 40, 1)))
        before = c.post("/v1/galleries/keep/identify", files=probe).json()
        listed = c.get("/v1/galleries/keep/identities").json()
    # uvicorn finishes the requests, runs the app's shutdown, then ends by the signal it caught (as systemd expects)
    assert server.stop() in (0, -signal.SIGTERM)
    assert "the store is closed" in server.log.read_text()
    server.start()
    with server.client() as c:
        assert c.get("/v1/galleries/keep/identities").json() == listed
        after = c.post("/v1/galleries/keep/identify", files=probe).json()
    assert after["results"][0]["top_k"] == before["results"][0]["top_k"]
