"""The page at / in a real browser: Debian's headless Chromium driven by Playwright (never a downloaded browser),
against a real `siamkit serve` on 127.0.0.1. It uploads two AT&T photos and reads the decision, the score and the
two faces the model saw; enrols photos under names and identifies another; saves a screenshot into tmp_path.
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import siamkit
from _serve_helpers import Server

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
                 "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
# The page prints scores with 4 decimals, as `siamkit verify` does: each rounding is off by at most 0.5e-4, and
# the server's batched forward pass differs from the CLI's by float32 rounding (~1e-6): 1.1e-4 covers both.
SHOWN_SCORE_TOL = 1.1e-4
# The server and this process embed the same pixels with the same model; only float32 rounding (~1e-6) differs,
# so their decisions agree for any score further than this from the threshold.
DECISION_MARGIN = 1e-4


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    running = Server(trained_run, tmp_path_factory.mktemp("serve_page") / "data").start()
    yield running.url
    running.stop()


def shown_png(page, selector: str) -> np.ndarray:
    """The pixels of an <img> the page filled from a data: URL, as an H x W (x C) uint8 array."""
    src = page.get_attribute(selector, "src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
        return np.asarray(im)


def as_hwc(pixels: np.ndarray) -> np.ndarray:
    """Verifier.pixels' C x H x W as the PNG holds it: H x W for one channel, H x W x C otherwise."""
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def test_the_page_verifies_two_photos_like_siamkit_verify_and_enrols_and_identifies(
        browser, server, trained_run, att_faces, cli, tmp_path):
    verifier = siamkit.load(trained_run)
    photo1, photo2 = pair_off_the_threshold(verifier, att_faces)
    printed = cli("verify", str(trained_run), str(photo1), str(photo2))
    assert printed.returncode == 0, printed.stderr
    score, threshold, decision = re.search(r"score (\S+)\s+threshold (\S+)\s+(SAME|DIFFERENT)", printed.stdout).groups()

    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#image1", str(photo1))
    page.set_input_files("#image2", str(photo2))
    page.click("#verify-button")
    page.wait_for_selector("#verify-result:not([hidden])", timeout=60_000)
    assert page.text_content("#decision").strip().upper() == decision
    assert abs(float(page.text_content("#score")) - float(score)) <= SHOWN_SCORE_TOL
    # the faces shown are exactly the model's input: the pixels siamkit embeds for each photo
    for selector, photo in (("#face1", photo1), ("#face2", photo2)):
        np.testing.assert_array_equal(shown_png(page, selector), as_hwc(verifier.pixels(photo)))

    enrol(page, "page-test", {"s5": att_faces / "s5" / "1.pgm", "s6": att_faces / "s6" / "1.pgm"})
    probe = att_faces / "s5" / "2.pgm"
    page.set_input_files("#identify-image", str(probe))
    page.click("#identify-button")
    page.wait_for_selector("#identify-table:not([hidden])", timeout=60_000)
    # the same answer from this process's copy of the model: one photo per person, so the top identity is the
    # one whose photo scores highest, and it is named only at or above the calibrated threshold
    scores = {name: float(verifier.score(probe, att_faces / name / "1.pgm")) for name in ("s5", "s6")}
    best = max(scores, key=scores.get)
    assert abs(scores[best] - verifier.threshold_for()) > DECISION_MARGIN, "too close to the threshold to compare"
    rows = page.locator("#identify-table tbody tr").all_inner_texts()
    assert rows[0].split()[0] == best and abs(float(rows[0].split()[1]) - scores[best]) <= SHOWN_SCORE_TOL
    expected = f"identified as {best}" if scores[best] >= verifier.threshold_for() else "unknown"
    assert page.text_content("#identify-result").startswith(expected)
    assert page.locator("#error").is_hidden()

    screenshot = tmp_path / "serve_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as shot:
        assert shot.width > 0 and shot.height > 0
    print(f"screenshot of the page: {screenshot}")
    page.close()


def pair_off_the_threshold(verifier, att_faces: Path) -> tuple[Path, Path]:
    """Two photos of one person whose score is not within DECISION_MARGIN of the threshold (the model is trained
    afresh on each machine: which pair that is may differ)."""
    for person in range(3, 13):
        pair = att_faces / f"s{person}" / "1.pgm", att_faces / f"s{person}" / "4.pgm"
        if abs(float(verifier.score(*pair)) - verifier.threshold_for()) > DECISION_MARGIN:
            return pair
    raise AssertionError("every pair scores at the threshold: the test run did not train")


def enrol(page, gallery: str, photos: dict[str, Path]) -> None:
    page.fill("#gallery-name", gallery)
    for name, photo in photos.items():
        page.fill("#enroll-name", name)
        page.set_input_files("#enroll-image", str(photo))
        page.click("#enroll-button")
        page.wait_for_function(f"document.getElementById('enroll-result').textContent.includes({name!r})",
                               timeout=60_000)


def test_the_page_sends_the_api_key_typed_into_it(browser, trained_run, att_faces, cli, tmp_path):
    keys = tmp_path / "keys"
    created = cli("serve-keys", "create", "--file", str(keys), "--scope", "read")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    keyed = Server(trained_run, tmp_path / "data", "--api-keys", str(keys)).start()
    try:
        url = keyed.url
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#image1", str(att_faces / "s7" / "1.pgm"))
        page.set_input_files("#image2", str(att_faces / "s8" / "1.pgm"))
        page.click("#verify-button")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "API key" in page.text_content("#error") and page.locator("#verify-result").is_hidden()

        page.fill("#api-key", token)
        page.click("#verify-button")
        page.wait_for_selector("#verify-result:not([hidden])", timeout=60_000)
        assert page.text_content("#decision") in ("same", "different") and page.locator("#error").is_hidden()
        page.close()
    finally:
        keyed.stop()
