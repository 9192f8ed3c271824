"""Two real servers on one PostgreSQL database: each sees the other's enrolments and deletions without a restart
(LISTEN/NOTIFY keeps each one's index current); PostgreSQL restarted under them: requests fail cleanly with a
one-line 503 while it is down, the process stays up, and both recover by themselves when it is back."""
from __future__ import annotations

import httpx
import pytest

from _serve_helpers import Server
from pg_fixtures import eventually, pg_dsn, postgres_server  # noqa: F401  (fixtures: imported, not in a conftest.py)


def image(att_faces, person: int, k: int = 1):
    return ("image", (f"{k}.pgm", (att_faces / f"s{person}" / f"{k}.pgm").read_bytes()))


def searched(http: httpx.Client, probe) -> set[str]:
    """The identities the server's index searched (top-k, k=5, covers these small galleries whole)."""
    r = http.post("/v1/galleries/team/identify", files=[probe])
    assert r.status_code == 200, r.text
    return {row["identity"] for row in r.json()["results"][0]["top_k"]}


def identities(http: httpx.Client) -> dict[str, int]:
    r = http.get("/v1/galleries/team/identities")
    return {row["identity"]: row["images"] for row in r.json()["identities"]} if r.status_code == 200 else {}


@pytest.fixture
def two_servers(trained_run, pg_dsn, tmp_path):
    servers = [Server(trained_run, tmp_path / f"data{i}", "--db", pg_dsn).start() for i in (1, 2)]
    clients = [httpx.Client(base_url=s.url, timeout=60) for s in servers]
    yield clients
    for c in clients:
        c.close()
    for s in servers:
        s.stop()


def test_two_servers_share_a_gallery_and_recover_from_a_postgres_restart(two_servers, postgres_server, att_faces):
    a, b = two_servers
    assert a.post("/v1/galleries/team/enroll", data={"identity": "s1"}, files=[image(att_faces, 1, 1)]).status_code == 200
    eventually(lambda: identities(b) == {"s1": 1}, "b lists a's enrolment")
    assert b.post("/v1/galleries/team/enroll", data={"identity": "s2"},
                  files=[image(att_faces, 2, 1), image(att_faces, 2, 2)]).status_code == 200
    assert searched(a, image(att_faces, 2, 3)) >= {"s1"}
    eventually(lambda: searched(a, image(att_faces, 2, 3)) == {"s1", "s2"}, "a's index holds whom b enrolled")
    assert a.delete("/v1/galleries/team/identities/s2").status_code == 200
    eventually(lambda: searched(b, image(att_faces, 2, 3)) == {"s1"}, "b's index forgets whom a deleted")

    postgres_server.stop()
    try:
        for http in (a, b):
            for r in (http.post("/v1/galleries/team/enroll", data={"identity": "s3"}, files=[image(att_faces, 3)]),
                      http.post("/v1/galleries/team/identify", files=[image(att_faces, 1, 2)]),
                      http.get("/v1/galleries/team/identities"), http.get("/readyz")):
                assert r.status_code == 503, r.text
                assert "unreachable" in r.json()["error"] and "\n" not in r.json()["error"]
            assert http.get("/healthz").status_code == 200  # the process itself is up
            assert http.post("/v1/verify", files=[("image1", image(att_faces, 1)[1]),
                                                  ("image2", image(att_faces, 2)[1])]).status_code == 200  # no store
    finally:
        postgres_server.start()
    # no server restart: the next requests succeed, and the servers see each other's writes again
    for http in (a, b):
        assert http.get("/readyz").status_code == 200
        assert identities(http) == {"s1": 1}  # the enrolment that failed with 503 was not stored
    assert b.post("/v1/galleries/team/enroll", data={"identity": "s3"}, files=[image(att_faces, 3, 1)]).status_code == 200
    eventually(lambda: searched(a, image(att_faces, 3, 2)) == {"s1", "s3"}, "a's index holds whom b enrolled after "
               "the restart")
