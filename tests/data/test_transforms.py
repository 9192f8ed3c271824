import numpy as np
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
