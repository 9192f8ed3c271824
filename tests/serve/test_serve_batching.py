"""Dynamic batching: concurrent requests share forward passes (counted by the batcher, never timed), each request
gets its own rows back, and SIGTERM lets the requests in flight finish."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from siamkit.serve.batching import Batcher
from _serve_helpers import Server, att_file, files

LONG_WAIT_MS = 10_000  # a bound the batch closes by at the latest; these tests close batches by filling them


class CountingModel:
    """An embed function that records each forward pass's size; a row is the image's pixel sum (checkable)."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(len(pixels))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("the model broke")
        return pixels.reshape(len(pixels), -1).sum(1, keepdims=True).astype(np.float32)


def images(*values: int) -> np.ndarray:
    return np.stack([np.full((1, 2, 2), v, np.uint8) for v in values])


async def submit_all(batcher: Batcher, jobs: list[np.ndarray]) -> list:
    return await asyncio.gather(*(batcher.run(j) for j in jobs), return_exceptions=True)


def run_jobs(model, jobs, **options) -> list:
    batcher = Batcher(model, **options)
    try:
        return asyncio.run(submit_all(batcher, jobs))
    finally:
        batcher.close()


def test_concurrent_requests_share_one_forward_pass_and_get_their_own_rows():
    model = CountingModel()
    got = run_jobs(model, [images(1, 2), images(3, 4), images(5, 6)], max_batch=6, max_wait_ms=LONG_WAIT_MS)
    assert model.calls == [6]
    for rows, (a, b) in zip(got, [(1, 2), (3, 4), (5, 6)]):
        np.testing.assert_array_equal(rows[:, 0], [4 * a, 4 * b])  # 4 pixels of value v each


def test_max_batch_one_is_batching_off():
    model = CountingModel()
    got = run_jobs(model, [images(1), images(2), images(3)], max_batch=1, max_wait_ms=LONG_WAIT_MS)
    assert model.calls == [1, 1, 1]
    assert [int(r[0, 0]) for r in got] == [4, 8, 12]


def test_a_request_that_does_not_fit_opens_the_next_batch():
    model = CountingModel()
    got = run_jobs(model, [images(1, 1, 1), images(2, 2, 2), images(3)], max_batch=4, max_wait_ms=LONG_WAIT_MS)
    assert model.calls == [4, 3] or model.calls == [3, 4]  # [1,1,1]+[3] then [2,2,2], or [1,1,1] then [2,2,2]+[3]
    assert [r[:, 0].tolist() for r in got] == [[4, 4, 4], [8, 8, 8], [12]]


def test_a_failed_pass_fails_its_requests_only():
    model = CountingModel(fail_on=1)
    batcher = Batcher(model, max_batch=2, max_wait_ms=LONG_WAIT_MS)
    try:
        first = asyncio.run(submit_all(batcher, [images(1), images(2)]))
        second = asyncio.run(submit_all(batcher, [images(3, 3)]))  # a full batch: no wait
    finally:
        batcher.close()
    assert all(isinstance(e, RuntimeError) for e in first)
    assert second[0][:, 0].tolist() == [12, 12]


def test_stats_count_passes_by_size():
    model = CountingModel()
    batcher = Batcher(model, max_batch=4, max_wait_ms=LONG_WAIT_MS)
    try:
        asyncio.run(submit_all(batcher, [images(1, 2), images(3, 4)]))
        stats = batcher.stats()
    finally:
        batcher.close()
    assert stats["forward_passes"] == 1 and stats["images"] == 4 and stats["batch_sizes"] == {"4": 1}
    assert stats["waiting_images"] == 0


# ---------------------------------------------------------------- a real server

BATCH = 8
SERVER_WAIT_MS = 5000  # an upper bound: four local requests arrive long before; the batch closes when full


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    s = Server(trained_run, tmp_path_factory.mktemp("serve_batching") / "data", "--max-batch", str(BATCH),
               "--max-wait-ms", str(SERVER_WAIT_MS)).start()
    yield s
    s.stop()


def verify_in_threads(server: Server, att_faces, n: int) -> tuple[list[threading.Thread], list]:
    answers: list = [None] * n

    def ask(i: int) -> None:
        with server.client() as c:
            answers[i] = c.post("/v1/verify", files=files(image1=att_file(att_faces, i + 1, 1),
                                                          image2=att_file(att_faces, i + 1, 2)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, answers


def test_concurrent_verifies_go_through_one_forward_pass(server, att_faces):
    with server.client() as c:
        before = c.get("/v1/stats").json()
    threads, answers = verify_in_threads(server, att_faces, BATCH // 2)
    for t in threads:
        t.join(120)
    assert all(a is not None and a.status_code == 200 for a in answers), answers
    with server.client() as c:
        after = c.get("/v1/stats").json()
    assert after["forward_passes"] - before["forward_passes"] == 1
    assert after["batch_sizes"].get(str(BATCH), 0) - before["batch_sizes"].get(str(BATCH), 0) == 1


def test_sigterm_finishes_the_requests_in_flight(server, att_faces):
    threads, answers = verify_in_threads(server, att_faces, 3)  # 6 images: they wait for a batch of 8
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/v1/stats").json()["waiting_images"] < 6:
        assert time.monotonic() < deadline, "the requests never reached the batcher"
        time.sleep(0.05)
    code = server.stop()
    for t in threads:
        t.join(120)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert all(a.json()["decision"] in ("same", "different") for a in answers)
    assert code in (0, -signal.SIGTERM)
    assert "the store is closed" in server.log.read_text()
