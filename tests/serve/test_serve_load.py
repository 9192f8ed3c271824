"""`siamkit serve` under load, on 127.0.0.1: 16 concurrent clients x 200 verify requests, and 4 clients enrolling
while 12 identify. Every answer must be a 200 with the right content (no request gets another's result when the
batcher groups them); p50/p99 latencies are printed, never asserted (no test depends on timing).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

import siamkit
from _serve_helpers import Server

pytest.importorskip("fastapi")

VERIFY_CLIENTS, VERIFY_REQUESTS = 16, 200
ENROLLERS, IDENTIFIERS, ENROLMENTS_EACH, IDENTIFIES_EACH = 4, 12, 10, 40
# Scores of one pair served in batches of different sizes differ only by float32 rounding in the forward pass
# (the same arithmetic, other blocking of the matrix products): ~1e-6 on cosine scores in [-1, 1]. 1e-4 leaves
# room for that and still tells apart any two of the pairs below, which the test first checks are further apart.
SCORE_TOL = 1e-4


def pgm(att_faces, person: int, photo: int) -> bytes:
    return (att_faces / f"s{person}" / f"{photo}.pgm").read_bytes()


def latency_line(what: str, seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return (f"{what}: {len(ms)} requests, p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")


async def timed(latencies: list[float], request):
    start = time.perf_counter()
    response = await request
    latencies.append(time.perf_counter() - start)
    return response


def distinct_pairs(verifier, att_faces, n: int) -> tuple[list, list[float]]:
    """n AT&T pairs (genuine and impostor) whose scores are all further apart than 5 x SCORE_TOL, with the scores
    (the test model is trained afresh on each machine: which pairs those are may differ)."""
    candidates = [(att_faces / f"s{p}" / "1.pgm", att_faces / f"s{q}" / "2.pgm")
                  for p in range(1, 40) for q in (p, p + 1)]
    chosen, scores = [], []
    for pair in candidates:
        score = float(verifier.score(*pair))
        if all(abs(score - other) > 5 * SCORE_TOL for other in scores):
            chosen.append(pair)
            scores.append(score)
            if len(chosen) == n:
                return chosen, scores
    raise AssertionError(f"fewer than {n} AT&T pairs score apart: a mixed-up answer could go unseen")


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    running = Server(trained_run, tmp_path_factory.mktemp("serve_load") / "data").start()
    yield running.url
    running.stop()


def test_16_clients_x_200_verify_requests_all_answered_with_their_own_scores(server, trained_run, att_faces,
                                                                           capsys):
    # Each client sends one pair of its own, and no two pairs score alike: a batcher that handed a result to the
    # wrong request would show as a score that is not this pair's.
    verifier = siamkit.load(trained_run)  # the same model in this process: an independent path to each score
    paths, expected = distinct_pairs(verifier, att_faces, VERIFY_CLIENTS)
    pairs = [(a.read_bytes(), b.read_bytes()) for a, b in paths]

    latencies: list[float] = []

    async def client(pair: tuple[bytes, bytes]) -> list[httpx.Response]:
        files = {"image1": ("a.pgm", pair[0]), "image2": ("b.pgm", pair[1])}
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return [await timed(latencies, http.post("/v1/verify", files=files)) for _ in range(VERIFY_REQUESTS)]

    async def all_clients():
        return await asyncio.gather(*(client(pair) for pair in pairs))

    answers = asyncio.run(all_clients())
    with capsys.disabled():
        print("\n" + latency_line(f"verify, {VERIFY_CLIENTS} clients", latencies))
    for pair_answers, score in zip(answers, expected):
        assert len(pair_answers) == VERIFY_REQUESTS
        failed = [r.text for r in pair_answers if r.status_code != 200]
        assert not failed, failed[0]
        scores = np.array([r.json()["score"] for r in pair_answers])
        assert np.abs(scores - score).max() <= SCORE_TOL


def test_4_clients_enrolling_while_12_identify_every_enrolment_is_kept(server, att_faces, capsys):
    gallery = "load"
    with httpx.Client(base_url=server, timeout=120) as http:  # the gallery exists before anyone identifies
        seed = http.post(f"/v1/galleries/{gallery}/enroll", data={"identity": "seed"},
                         files={"image": ("s40.pgm", pgm(att_faces, 40, 1))})
        assert seed.status_code == 200, seed.text
    # enroller e enrols ENROLMENTS_EACH people, two photos each: AT&T people 1..40 in turn
    names = {f"e{e}-p{k}": 1 + (e * ENROLMENTS_EACH + k) % 39 for e in range(ENROLLERS) for k in range(ENROLMENTS_EACH)}
    enrol_latencies: list[float] = []
    identify_latencies: list[float] = []
    done = asyncio.Event()

    async def enroller(http: httpx.AsyncClient, e: int) -> list[httpx.Response]:
        answers = []
        for k in range(ENROLMENTS_EACH):
            person = names[f"e{e}-p{k}"]
            files = [("image", ("1.pgm", pgm(att_faces, person, 1))), ("image", ("2.pgm", pgm(att_faces, person, 2)))]
            answers.append(await timed(enrol_latencies, http.post(f"/v1/galleries/{gallery}/enroll",
                                                                  data={"identity": f"e{e}-p{k}"}, files=files)))
        return answers

    async def identifier(http: httpx.AsyncClient, i: int) -> list[httpx.Response]:
        answers, probe = [], pgm(att_faces, 1 + i % 39, 3)
        while not done.is_set() and len(answers) < IDENTIFIES_EACH:
            answers.append(await timed(identify_latencies, http.post(f"/v1/galleries/{gallery}/identify",
                                                                     files={"image": ("p.pgm", probe)})))
        return answers

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120,
                                     limits=httpx.Limits(max_connections=ENROLLERS + IDENTIFIERS)) as http:
            identifying = [asyncio.create_task(identifier(http, i)) for i in range(IDENTIFIERS)]
            enrolled = await asyncio.gather(*(enroller(http, e) for e in range(ENROLLERS)))
            done.set()
            return enrolled, await asyncio.gather(*identifying)

    enrolled, identified = asyncio.run(run())
    with capsys.disabled():
        print("\n" + latency_line(f"enroll, {ENROLLERS} clients", enrol_latencies)
              + "\n" + latency_line(f"identify, {IDENTIFIERS} clients alongside", identify_latencies))
    responses = [r for answers in enrolled + identified for r in answers]
    assert all(r.status_code == 200 for r in responses), next(r.text for r in responses if r.status_code != 200)
    assert identified and all(identified), "every identifying client got answers while the others enrolled"
    for answers in identified:
        for r in answers:
            assert r.json()["results"][0]["identity"] in {"seed", "unknown", *names}
    image_ids = [i for answers in enrolled for r in answers for i in r.json()["image_ids"]]
    assert len(image_ids) == len(set(image_ids)) == 2 * len(names)

    with httpx.Client(base_url=server, timeout=120) as http:
        listed = http.get(f"/v1/galleries/{gallery}/identities").json()["identities"]
    assert {row["identity"]: row["images"] for row in listed} == {"seed": 1, **{name: 2 for name in names}}

