import numpy as np
import pytest
import torch
from PIL import Image

from siamkit.data.transforms import Preprocess, augment, image_to_uint8, normalize


def test_center_crop_keeps_the_middle():
    # 100x60 (WxH) image whose value is the column index: a 0.5 crop of the shorter side keeps 30x30 around the centre.
    arr = np.tile(np.arange(100, dtype=np.uint8), (60, 1))
    pre = Preprocess(image_size=(30, 30), center_crop=0.5, channels=1, mean=(0.5,), std=(0.5,))
    out = image_to_uint8(Image.fromarray(arr), pre)
    assert out.shape == (1, 30, 30)
    # columns 35..64 survive (centre 50, half-width 15)
    np.testing.assert_array_equal(out[0, 0].numpy(), np.arange(35, 65))


def test_greyscale_becomes_rgb_and_back():
    img = Image.fromarray(np.full((8, 8), 200, dtype=np.uint8))
    rgb = image_to_uint8(img, Preprocess((8, 8), channels=3))
    assert rgb.shape == (3, 8, 8) and (rgb == 200).all()
    grey = image_to_uint8(Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)), Preprocess((4, 4), channels=1))
    assert grey.shape == (1, 4, 4)


def test_normalize_matches_formula():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    pre = Preprocess((2, 2), channels=1, mean=(0.5,), std=(0.25,))
    out = normalize(x, pre)
    expected = (np.array([[0, 255], [51, 102]]) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-6)


def test_augment_flips_and_shifts_like_manual_code():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.uint8).view(2, 1, 4, 5)
    g = torch.Generator().manual_seed(0)
    flipped = augment(x, torch.Generator().manual_seed(0), flip=True)
    decisions = torch.rand(2, generator=g) < 0.5
    for i in range(2):
        expected = x[i].flip(-1) if decisions[i] else x[i]
        assert torch.equal(flipped[i], expected)
    shifted = augment(x, torch.Generator().manual_seed(1), flip=False, shift=1)
    g = torch.Generator().manual_seed(1)
    dy = torch.randint(0, 3, (2,), generator=g)
    dx = torch.randint(0, 3, (2,), generator=g)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    for i in range(2):
        expected = padded[i, :, dy[i] : dy[i] + 4, dx[i] : dx[i] + 5]
        np.testing.assert_array_equal(shifted[i].numpy(), expected)


def test_augment_shift_reaching_past_the_border_repeats_the_edge():
    # Three channels, shifts of up to 3 pixels on a 4x5 image: most output pixels come from the padding.
    x = torch.randint(0, 256, (16, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    shifted = augment(x, torch.Generator().manual_seed(3), flip=False, shift=3)
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 7, (16,), generator=g)
    dx = torch.randint(0, 7, (16,), generator=g)
    assert len(set(dy.tolist())) > 3  # the seed covers several shifts
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="edge")
    assert shifted.dtype == torch.uint8
    for i in range(16):
        np.testing.assert_array_equal(shifted[i].numpy(), padded[i, :, dy[i] : dy[i] + 4, dx[i] : dx[i] + 5])


# --------------------------------------------------------------------------- FaceAugment

from siamkit.data.transforms import FaceAugment  # noqa: E402

STILL = dict(scale=(1.0, 1.0), rotation=0.0, shift=0.0, flip=0.0, brightness_contrast=0.0, erase=0.0)


def faces_batch(n: int = 6, c: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_face_augment_with_nothing_drawn_is_the_identity():
    # The identity grid samples every pixel at its own centre: bilinear weights (1, 0), exact after rounding.
    x = faces_batch(c=3)
    assert torch.equal(FaceAugment(**STILL)(x, torch.Generator().manual_seed(1)), x)


def test_face_augment_mirror_is_a_horizontal_flip():
    x = faces_batch()
    out = FaceAugment(**{**STILL, "flip": 1.0})(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, x.flip(-1))


def test_face_augment_brightness_and_contrast_by_hand():
    """Per image: (x - mean) * c + mean + b, clipped to [0, 1]; c and b are the 6th and 7th draws of the generator."""
    x = faces_batch(n=4)
    aug = FaceAugment(**{**STILL, "brightness_contrast": 0.3})
    out = aug(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = [torch.rand(4, generator=g) for _ in range(7)]  # scale, angle, tx, ty, mirror, contrast, brightness
    c, b = draws[5] * 0.6 + 0.7, draws[6] * 0.3 - 0.15
    xf = x.double() / 255
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    expected = ((xf - mean) * c.double().view(-1, 1, 1, 1) + mean + b.double().view(-1, 1, 1, 1)).clamp(0, 1) * 255
    # float32 against float64: the values differ by ~1e-5 of a level, so rounding can differ by at most 1.
    assert (out.double() - expected.round()).abs().max() <= 1
    assert (out.double() - expected).abs().max() < 0.5 + 1e-3


def test_face_augment_is_a_pure_function_of_the_generator_and_draws_per_sample():
    x = faces_batch(n=1).expand(8, -1, -1, -1).contiguous()  # the same image 8 times
    aug = FaceAugment()
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # same seed, same output
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(4)))
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) == 8  # every sample drew its own warp, colour and erasing
    assert a.dtype == torch.uint8 and a.shape == x.shape


def test_face_augment_erases_one_rectangle_of_the_drawn_area():
    aug = FaceAugment(**{**STILL, "erase": 1.0, "erase_area": (0.1, 0.1)})
    g = torch.Generator().manual_seed(0)
    mask = aug._erase_mask(50, 20, 20, lambda lo, hi: torch.rand(50, generator=g) * (hi - lo) + lo)
    for m in mask:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        # a filled rectangle: its bounding box is all True
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        # 10% of 400 pixels = 40; integer sides (each floored, at least 1) keep it within [40/4, 40]
        assert 10 <= int(m.sum()) <= 40


def test_face_augment_overrides_change_only_the_fields_named():
    assert FaceAugment.from_overrides("") == FaceAugment()
    got = FaceAugment.from_overrides(" erase=0, rotation=15,scale=0.8:1.25")
    assert got == FaceAugment(erase=0.0, rotation=15.0, scale=(0.8, 1.25))
    # The parsed settings are the ones drawn with: everything off but a certain mirror mirrors every image.
    still = FaceAugment.from_overrides("scale=1:1,rotation=0,shift=0,flip=1,brightness_contrast=0,erase=0")
    x = faces_batch()
    assert torch.equal(still(x, torch.Generator().manual_seed(1)), x.flip(-1))


@pytest.mark.parametrize("text, message", [
    ("blur=1", "unknown field 'blur' in 'blur=1'; the fields are scale, rotation, shift, flip, brightness_contrast, "
               "erase, erase_area"),
    ("erase=2", "erase takes a value in [0, 1], got 2.0"),
    ("rotation=-5", "rotation takes a value in [0, 180], got -5.0"),
    ("scale=1.2", "'scale=1.2' needs LO:HI, two numbers, e.g. scale=0.9:1.15 (the default)"),
    ("scale=1.3:1.1", "scale takes LO:HI with 0 < LO <= HI <= 10, got 1.3:1.1"),
    ("scale=1:inf", "scale takes LO:HI with 0 < LO <= HI <= 10, got 1:inf"),
    ("flip=nan", "flip takes a value in [0, 1], got nan"),
    ("erase_area=0:0.5", "erase_area takes LO:HI with 0 < LO <= HI <= 1, got 0:0.5"),
    ("shift=a bit", "'shift=a bit' needs one number, e.g. shift=0.08 (the default)"),
])
def test_face_augment_overrides_refuse_bad_fields_in_one_line(text, message):
    from siamkit.errors import SiamkitError

    with pytest.raises(SiamkitError) as e:
        FaceAugment.from_overrides(text)
    assert str(e.value).startswith(f"--face-augment: {message}") and "\n" not in str(e.value)
