"""The template, the least-squares similarity estimate and the warp: exact checks against hand-made transforms."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from siamkit.errors import SiamkitError
from siamkit.faces.align import TEMPLATE_112, align_face, apply, estimate_similarity, photo_box, pick_face, template, warp
from siamkit.faces.detect import Face


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    r = np.deg2rad(degrees)
    return np.array([[scale * np.cos(r), -scale * np.sin(r), tx], [scale * np.sin(r), scale * np.cos(r), ty]])


@pytest.mark.parametrize("scale,degrees,tx,ty", [(1.0, 0.0, 0.0, 0.0), (0.37, 28.0, -41.5, 12.25), (2.5, -151.0, 300.0, -7.0)])
def test_estimate_recovers_a_hand_made_similarity(scale, degrees, tx, ty):
    m = similarity(scale, degrees, tx, ty)
    src = np.array([[10.0, 20.0], [55.0, 21.0], [30.0, 47.0], [12.0, 70.0], [50.0, 68.0]])
    dst = src @ m[:, :2].T + m[:, 2]  # exact landmarks in
    # float64 SVD on coordinates of size ~1e2-1e3: errors of order 1e-12, far below 1e-9
    np.testing.assert_allclose(estimate_similarity(src, dst), m, atol=1e-9)


def test_estimate_is_the_least_squares_fit_not_a_point_fit():
    # Noisy targets: the estimate must beat nearby similarities in summed squared error (it is the minimiser).
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    dst = apply(similarity(1.3, 10, 5, -3), src) + rng.normal(0, 2, (5, 2))
    m = estimate_similarity(src, dst)
    best = ((apply(m, src) - dst) ** 2).sum()
    for _ in range(200):
        s, d, tx, ty = 1.3 + rng.normal(0, .02), 10 + rng.normal(0, 1), 5 + rng.normal(0, .5), -3 + rng.normal(0, .5)
        assert ((apply(similarity(s, d, tx, ty), src) - dst) ** 2).sum() >= best


def test_estimate_never_reflects():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mirrored = src * [-1, 1]
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_template_scales_with_size_and_margin():
    np.testing.assert_allclose(template(112, 0.0), TEMPLATE_112)
    np.testing.assert_allclose(template(224, 0.0), TEMPLATE_112 * 2)
    # margin 0.5 adds half the face on each side: the face spans half the crop, about the same centre
    np.testing.assert_allclose(template(112, 0.5), (TEMPLATE_112 - 56) / 2 + 56)
    with pytest.raises(SiamkitError, match="--size"):
        template(4)
    with pytest.raises(SiamkitError, match="--margin"):
        template(112, -0.1)


def ramp(w: int, h: int) -> tuple[Image.Image, callable]:
    """A float image whose value is a linear function of (x, y): bilinear sampling reproduces it exactly."""
    f = lambda x, y: 0.75 * x - 0.5 * y + 1000.0  # noqa: E731
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return Image.fromarray(f(xs, ys).astype(np.float32), mode="F"), f


def test_warp_samples_the_photo_through_the_inverse_transform():
    img, f = ramp(300, 240)
    m = similarity(0.6, 23.0, -40.0, 30.0)  # photo -> crop
    out = np.asarray(warp(img, m, 112), dtype=np.float64)
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    src = apply(np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2], np.stack([xs.ravel(), ys.ravel()], 1))
    inside = (src[:, 0] >= 1) & (src[:, 0] <= 298) & (src[:, 1] >= 1) & (src[:, 1] <= 238)
    assert inside.sum() > 4000  # most of the crop samples inside the photo
    expected = f(src[:, 0], src[:, 1])
    # Linear data, bilinear weights: exact up to float32 storage (values ~1e3, eps 6e-8 -> 1e-4) and PIL's
    # float32 coordinate arithmetic (~1e-5 px times the 0.75 slope)
    np.testing.assert_allclose(out.ravel()[inside], expected[inside], atol=5e-3)


def test_align_face_puts_known_landmarks_on_the_template():
    # A photo made from a known similarity: its landmarks are the template carried through the inverse.
    img, f = ramp(400, 400)
    crop_to_photo = similarity(1.9, -17.0, 120.0, 95.0)
    lm = apply(crop_to_photo, template(112, 0.25))
    face = Face((0, 0, 400, 400), lm, "hog")
    out = np.asarray(align_face(img, face, size=112, margin=0.25)[0], dtype=np.float64)
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    src = apply(crop_to_photo, np.stack([xs.ravel(), ys.ravel()], 1))
    np.testing.assert_allclose(out.ravel(), f(src[:, 0], src[:, 1]), atol=5e-3)  # as above


def test_pick_face_largest_or_central():
    lm = np.zeros((5, 2))
    big = Face((0, 0, 100, 100), lm, "hog")
    central = Face((180, 180, 220, 220), lm, "hog")
    assert pick_face([central, big], (400, 400), "largest") is big
    assert pick_face([big, central], (400, 400), "center") is central


def test_warp_repeats_the_edge_beyond_the_photo():
    # Columns of distinct values: a crop that reaches past the left and right edges repeats the edge columns.
    arr = np.tile(np.arange(10, 60, dtype=np.uint8), (40, 1))  # 50 wide, 40 high, value = 10 + x
    img = Image.fromarray(arr, mode="L")
    m = similarity(1.0, 0.0, 20.0, 0.0)  # photo x -> crop x + 20: crop columns 0-19 lie left of the photo
    out = np.asarray(warp(img, m, 100))
    assert (out[:, :20] == 10).all()  # the left edge column, repeated
    assert (out[:, 20:70] == arr[0]).all()  # integer shift: the photo itself, exactly
    assert (out[:, 70:] == 59).all()  # the right edge column, repeated


def test_photo_box_of_an_upright_tight_crop_by_hand():
    # Scale 2, shift (10, -5): the 40x60 photo's pixel edges -0.5 and 39.5 (x), -0.5 and 59.5 (y) land at crop index
    # coordinates 2 * e + t, i.e. crop pixel edges 2 * e + t + 0.5: x 9.5 .. 89.5, y -5.5 .. 114.5 (clipped to 0, 112).
    m = similarity(2.0, 0.0, 10.0, -5.0)
    assert photo_box(m, (40, 60), 112) == [9.5, 0.0, 89.5, 112.0]
    # A photo reaching past the crop on every side: the whole crop shows the photo.
    assert photo_box(similarity(4.0, 0.0, -20.0, -20.0), (100, 100), 112) == [0.0, 0.0, 112.0, 112.0]


@pytest.mark.parametrize("degrees", [30.0, -30.0, 12.0])
def test_photo_box_of_a_turned_square_by_hand(degrees):
    # A square of side L centred at crop point c, turned by theta: its corners' x are c +- (L/2)(cos + sin) and
    # c +- (L/2)(cos - sin); the inner pair bounds the box, half-width (L/2)(cos|theta| - sin|theta|), same in y.
    side, centre = 80, 56.0
    r = np.deg2rad(degrees)
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    middle = np.array([side / 2 - 0.5, side / 2 - 0.5])  # the photo's centre in index coordinates
    t = (centre - 0.5) - rot @ middle  # index coordinates: crop edge coordinate 56 is index 55.5
    m = np.hstack([rot, t[:, None]])
    half = side / 2 * (np.cos(abs(r)) - np.sin(abs(r)))
    # photo_box rounds to 0.01
    np.testing.assert_allclose(photo_box(m, (side, side), 112), [centre - half, centre - half, centre + half, centre + half],
                               atol=0.006)
