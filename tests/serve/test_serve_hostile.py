"""Hostile input to a real `siamkit serve` with API keys: each answered by a 4xx JSON error in one line, the server
still up, the gallery unchanged and nothing written beside the store."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from _serve_helpers import Server, att_file, files, one_line_error, png_bomb, png_header_only

GALLERY = "people"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """A keys file made by `siamkit serve-keys create`, with a write key and a read key."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    tokens = {}
    for scope in ("write", "read"):
        done = run_cli("serve-keys", "create", "--file", str(path), "--scope", scope)
        assert done.returncode == 0, done.stderr
        tokens[scope] = done.stdout.strip()
    return {"file": path, **tokens}


@pytest.fixture(scope="module")
def server(trained_run, keys, att_faces, tmp_path_factory):
    s = Server(trained_run, tmp_path_factory.mktemp("serve_hostile") / "data", "--api-keys", str(keys["file"])).start()
    with s.client(authorization=f"Bearer {keys['write']}") as c:
        for person in (31, 32):
            r = c.post(f"/v1/galleries/{GALLERY}/enroll", data={"identity": f"s{person}"},
                       files=files(image=[att_file(att_faces, person, i) for i in (1, 2)]))
            assert r.status_code == 200, r.text
    yield s
    s.stop()


@pytest.fixture(scope="module")
def jpeg(data_root) -> bytes:
    folder = next(p for p in sorted((data_root / "rof_neutral").iterdir()) if p.is_dir())
    return sorted(folder.glob("*.jpg"))[0].read_bytes()


def snapshot(server: Server, token: str):
    """What must not change: the galleries, their identities and counts, and the files of the data folder."""
    with server.client(authorization=f"Bearer {token}") as c:
        galleries = c.get("/v1/galleries").json()
        people = c.get(f"/v1/galleries/{GALLERY}/identities").json()
    return galleries, people, sorted(p.name for p in server.data_dir.iterdir())


def face(att_faces, person=31, image=3) -> tuple:
    return ("s.pgm", att_file(att_faces, person, image).read_bytes(), "image/x-portable-graymap")


# (name, method, path, request keyword arguments built from (att_faces, jpeg), key scope or None, expected status)
CASES = [
    ("empty body", "post", "/v1/verify", lambda a, j: {"content": b""}, "read", 415),
    ("empty multipart", "post", "/v1/verify",
     lambda a, j: {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, "read", 400),
    ("empty image", "post", "/v1/verify",
     lambda a, j: {"files": [("image1", ("a.jpg", b"", "image/jpeg")), ("image2", face(a))]}, "read", 400),
    ("truncated jpeg", "post", "/v1/verify",
     lambda a, j: {"files": [("image1", ("a.jpg", j[:len(j) // 2], "image/jpeg")), ("image2", face(a))]}, "read", 400),
    ("text named .jpg", "post", "/v1/verify",
     lambda a, j: {"files": [("image1", ("a.jpg", b"hello, I am text\n" * 50, "image/jpeg")), ("image2", face(a))]},
     "read", 400),
    ("20000x20000 png bomb", "post", "/v1/verify",
     lambda a, j: {"files": [("image1", ("bomb.png", png_bomb(), "image/png")), ("image2", face(a))]}, "read", 400),
    ("header claiming 8000x8000", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", ("big.png", png_header_only(8000, 8000),
                                                                     "image/png"))]}, "write", 400),
    ("50 MB upload", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", ("big.pgm", bytes(50 * 2**20), "image/png"))]},
     "write", 413),
    ("wrong field names", "post", "/v1/verify",
     lambda a, j: {"files": [("imageA", face(a)), ("imageB", face(a))]}, "read", 400),
    ("one image of two", "post", "/v1/verify", lambda a, j: {"files": [("image1", face(a))]}, "read", 400),
    ("negative top-k", "post", f"/v1/galleries/{GALLERY}/identify",
     lambda a, j: {"data": {"top_k": "-3"}, "files": [("image", face(a))]}, "read", 400),
    ("huge top-k", "post", f"/v1/galleries/{GALLERY}/identify",
     lambda a, j: {"data": {"top_k": str(10**12)}, "files": [("image", face(a))]}, "read", 400),
    ("top-k not a number", "post", f"/v1/galleries/{GALLERY}/identify",
     lambda a, j: {"data": {"top_k": "five"}, "files": [("image", face(a))]}, "read", 400),
    ("unknown gallery", "post", "/v1/galleries/nobody/identify", lambda a, j: {"files": [("image", face(a))]},
     "read", 404),
    ("identity with a path separator", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "../../etc/passwd"}, "files": [("image", face(a))]}, "write", 400),
    ("identity with a backslash", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "a\\b"}, "files": [("image", face(a))]}, "write", 400),
    ("identity with control characters", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "eve\x00\nroot"}, "files": [("image", face(a))]}, "write", 400),
    ("identity too long", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "x" * 1000}, "files": [("image", face(a))]}, "write", 400),
    ("gallery name with dots and spaces", "post", "/v1/galleries/..%20x/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", face(a))]}, "write", 400),
    ("gallery name with an encoded separator", "post", "/v1/galleries/..%2F..%2Fetc/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", face(a))]}, "write", 404),
    ("missing key on a write", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", face(a))]}, None, 401),
    ("wrong key on a write", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", face(a))], "headers": {"x-api-key": "sk_nope"}},
     None, 401),
    ("read-only key on a write", "post", f"/v1/galleries/{GALLERY}/enroll",
     lambda a, j: {"data": {"identity": "s33"}, "files": [("image", face(a))]}, "read-as-write", 403),
    ("read-only key on a delete", "delete", f"/v1/galleries/{GALLERY}/identities/s31", lambda a, j: {},
     "read-as-write", 403),
    ("missing key on a read", "get", "/v1/galleries", lambda a, j: {}, None, 401),
    ("far above 1", "post", "/v1/verify", lambda a, j: {"files": [("image1", face(a)), ("image2", face(a))],
                                                        "data": {"far": "1.5"}}, "read", 400),
    ("far of 0", "post", "/v1/verify", lambda a, j: {"files": [("image1", face(a)), ("image2", face(a))],
                                                     "data": {"far": "0"}}, "read", 400),
    ("far not a number", "post", "/v1/verify", lambda a, j: {"files": [("image1", face(a)), ("image2", face(a))],
                                                             "data": {"far": "nan"}}, "read", 400),
    ("json that is not an object", "post", "/v1/verify", lambda a, j: {"json": [1, 2]}, "read", 400),
    ("json with bad base64", "post", "/v1/verify", lambda a, j: {"json": {"image1": "***", "image2": "***"}},
     "read", 400),
    ("delete an image id that is not a number", "delete", f"/v1/galleries/{GALLERY}/images/abc", lambda a, j: {},
     "write", 422),
]


@pytest.mark.parametrize("name, method, path, build, scope, status", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused_in_one_line(server, keys, att_faces, jpeg, name, method, path, build, scope,
                                                status):
    before = snapshot(server, keys["write"])
    kwargs = build(att_faces, jpeg)
    token = {"read": keys["read"], "read-as-write": keys["read"], "write": keys["write"]}.get(scope)
    headers = {**({"authorization": f"Bearer {token}"} if token else {}), **kwargs.pop("headers", {})}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        response = c.request(method.upper(), path, headers=headers, **kwargs)
    line = one_line_error(response, status)
    assert "Traceback" not in line and len(line) < 400
    assert server.alive()
    assert snapshot(server, keys["write"]) == before


def test_a_good_request_with_the_keys_still_works(server, keys, att_faces):
    """The refusals above are the inputs', not the server's: the same requests done right succeed."""
    with server.client(authorization=f"Bearer {keys['read']}") as c:
        r = c.post(f"/v1/galleries/{GALLERY}/identify", files=files(image=att_file(att_faces, 31, 5)),
                   data={"top_k": "2"})
        assert r.status_code == 200 and len(r.json()["results"][0]["top_k"]) == 2
    with server.client(**{"x-api-key": keys["write"]}) as c:
        assert c.post(f"/v1/galleries/{GALLERY}/enroll", data={"identity": "s33"},
                      files=files(image=att_file(att_faces, 33, 1))).status_code == 200
        assert c.delete(f"/v1/galleries/{GALLERY}/identities/s33").json()["deleted_images"] == 1


def test_a_gallery_of_another_model_is_refused_in_one_line(server, keys, att_faces):
    """A gallery recorded with another model's stamp: enrolling into it and searching it are refused (409)."""
    import sqlite3

    db = sqlite3.connect(server.data_dir / "galleries.sqlite")
    with db:
        db.execute("INSERT INTO galleries VALUES ('other', 'another-model', 8, 'cosine', ?)",
                   (np.ones(8, np.float32).tobytes(),))
    db.close()
    with server.client(authorization=f"Bearer {keys['write']}") as c:
        line = one_line_error(c.post("/v1/galleries/other/identify", files=files(image=att_file(att_faces, 31, 5))),
                              409)
        assert "another-model" in line
        one_line_error(c.post("/v1/galleries/other/enroll", data={"identity": "s31"},
                              files=files(image=att_file(att_faces, 31, 5))), 409)


@pytest.fixture(scope="module")
def aligning_server(trained_run, tmp_path_factory):
    s = Server(trained_run, tmp_path_factory.mktemp("serve_align") / "data", "--align").start()
    yield s
    s.stop()


def test_no_face_with_alignment_on(aligning_server):
    blank = io.BytesIO()
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank, "PNG")
    picture = ("blank.png", blank.getvalue(), "image/png")
    with aligning_server.client() as c:
        line = one_line_error(c.post("/v1/verify", files=[("image1", picture), ("image2", picture)]), 422)
        assert "no face" in line
        one_line_error(c.post("/v1/galleries/g/enroll", data={"identity": "x"}, files=[("image", picture)]), 422)
        assert c.get("/v1/galleries").json() == {"galleries": []}
    assert aligning_server.alive()
