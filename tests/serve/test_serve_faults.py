"""A real server killed with SIGKILL in the middle of a burst of concurrent enrolments (SQLite and PostgreSQL):
restarted on the same store, its gallery holds every enrolment that was acknowledged (HTTP 200) with exactly the
image ids the server answered, and no partial one (each enrolment sends three images in one request)."""
from __future__ import annotations

import threading

import httpx
import pytest

from _serve_helpers import Server
from siamkit.serve.store import open_store
from pg_fixtures import pg_dsn, postgres_server  # noqa: F401  (fixtures: imported, not in a conftest.py)

CLIENTS = 8
IMAGES_PER_ENROLMENT = 3
KILL_AFTER = 12  # acknowledged enrolments before the kill: the burst is well under way, clients still sending
MAX_PER_CLIENT = 500  # bounds each client's loop; the kill comes long before
WAIT_S = 300  # bound on the burst reaching KILL_AFTER on a busy 2-core machine


def enrolment_images(att_faces, client: int, i: int) -> list[tuple[str, tuple[str, bytes]]]:
    person = att_faces / f"s{1 + (client * 7 + i) % 40}"
    return [("image", (f"{k}.pgm", (person / f"{k}.pgm").read_bytes())) for k in range(1, IMAGES_PER_ENROLMENT + 1)]


class Burst:
    """CLIENTS threads enrolling distinct identities until their connection breaks; what the server acknowledged."""

    def __init__(self, url: str, att_faces):
        self.url, self.att_faces = url, att_faces
        self.acked: dict[str, list[int]] = {}
        self.failed: list[str] = []  # identities whose request got no answer (in flight at the kill)
        self.errors: list[str] = []  # answers other than 200 (none expected)
        self.enough = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(c,)) for c in range(CLIENTS)]

    def client(self, c: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for i in range(MAX_PER_CLIENT):
                name = f"c{c}-{i}"
                try:
                    r = http.post("/v1/galleries/burst/enroll", data={"identity": name},
                                  files=enrolment_images(self.att_faces, c, i))
                except httpx.TransportError:
                    with self.lock:
                        self.failed.append(name)
                    return
                with self.lock:
                    if r.status_code == 200:
                        self.acked[name] = r.json()["image_ids"]
                    else:
                        self.errors.append(f"{r.status_code} {r.text}")
                    if len(self.acked) >= KILL_AFTER:
                        self.enough.set()

    def run_until_killed(self, server: Server) -> None:
        for t in self.threads:
            t.start()
        reached = self.enough.wait(WAIT_S)
        server.proc.kill()  # SIGKILL: no shutdown of any kind, as a crash or the OOM killer ends a process
        server.proc.wait()
        server.stop()  # (only closes its log now)
        for t in self.threads:
            t.join(timeout=WAIT_S)
        assert reached, f"the burst did not reach {KILL_AFTER} enrolments: {self.errors[:3]} {server.log.read_text()}"


def gallery_by_identity(store_arg: str) -> dict[str, list[int]]:
    """The store's rows, read directly (not through the server): identity -> image ids."""
    store = open_store(store_arg)
    try:
        ids, names, _, _ = store.rows("burst")
    finally:
        store.close()
    found: dict[str, list[int]] = {}
    for image_id, name in zip(ids, names):
        found.setdefault(name, []).append(int(image_id))
    return found


@pytest.fixture(params=["sqlite", "postgres"])
def store_args(request, tmp_path) -> tuple[tuple[str, ...], str]:
    """The server's options after --data-dir tmp_path/data (which --db overrides), and the store they name."""
    if request.param == "sqlite":
        return (), str(tmp_path / "data")
    dsn = request.getfixturevalue("pg_dsn")
    return ("--db", dsn), dsn


def test_sigkill_during_enrolments_keeps_every_acknowledged_one_and_no_partial(trained_run, att_faces, tmp_path,
                                                                               store_args):
    options, store = store_args
    server = Server(trained_run, tmp_path / "data", *options).start()
    burst = Burst(server.url, att_faces)
    burst.run_until_killed(server)
    assert burst.errors == [] and burst.failed, "the kill came while requests were in flight"

    restarted = Server(trained_run, tmp_path / "data", *options).start()
    try:
        listed = httpx.get(f"{restarted.url}/v1/galleries/burst/identities", timeout=60).json()["identities"]
        counts = {row["identity"]: row["images"] for row in listed}
        assert set(burst.acked) <= set(counts)  # every acknowledged enrolment is there
        assert set(counts.values()) == {IMAGES_PER_ENROLMENT}  # and every one there is whole
        assert set(counts) <= set(burst.acked) | set(burst.failed)  # nothing that was never sent
        # the restarted server searches the gallery rebuilt from the store, and still takes enrolments
        probe = enrolment_images(att_faces, 0, 0)[0][1]
        found = httpx.post(f"{restarted.url}/v1/galleries/burst/identify", files=[("image", probe)], timeout=60)
        assert found.status_code == 200 and found.json()["results"][0]["top_k"]
        again = httpx.post(f"{restarted.url}/v1/galleries/burst/enroll", data={"identity": "after"},
                           files=enrolment_images(att_faces, 99, 0), timeout=60)
        assert again.status_code == 200
    finally:
        restarted.stop()
    stored = gallery_by_identity(store)
    for name, ids in burst.acked.items():
        assert stored[name] == ids  # exactly the image ids the server acknowledged
