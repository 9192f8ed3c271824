"""dlib's face ResNet in PyTorch: add_prev against a hand computation, the stage shapes, and parity with dlib itself.

Parity: dlib-bin's own compute_face_descriptor (C++) on face chips of real people (AT&T and ROF-neutral photos
through siamkit's detector and dlib's get_face_chip) and on random-pixel chips, against DlibDescriptor with the
weights read by siamkit's reader from the same installed file.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from siamkit.models.dlib_resnet import (
    DLIB_CHIP_SIZE, DLIB_SAME_PERSON_DISTANCE, Affine, DlibDescriptor, DlibFaceResNet, add_prev, backbone_state,
    dlib_resnet29,
)

dlib = pytest.importorskip("dlib")

# Two photos of each of these people (different files, so genuine pairs exist among the chips).
ATT_PHOTOS = [f"att_faces/s{person}/{i}.pgm" for person in (1, 7, 23, 35) for i in (1, 6)]
ROF_PHOTOS = [f"rof_neutral/{person}/{i:06d}.jpg" for person in ("adrien_brody", "al_pacino", "alain_delon",
                                                               "amber_heard") for i in (1, 4)]
N_RANDOM_CHIPS = 6


# ---------------------------------------------------------------- add_prev and the shapes


def test_add_prev_pads_the_smaller_operand_at_the_end_of_channels_and_space():
    # dlib's tt::add: out[c, r, x] = a[c, r, x] (0 outside a) + b[c, r, x] (0 outside b), over the larger extents.
    a = torch.arange(1, 1 + 2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)  # 2 channels, 3x3
    b = 100 * torch.arange(1, 1 + 1 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4)  # 1 channel, 4x4
    expected = torch.zeros(1, 2, 4, 4)
    for c, r, x in itertools.product(range(2), range(4), range(4)):
        if r < 3 and x < 3:
            expected[0, c, r, x] += a[0, c, r, x]
        if c < 1:
            expected[0, c, r, x] += b[0, c, r, x]
    assert torch.equal(add_prev(a, b), expected)
    assert torch.equal(add_prev(b, a), expected)
    # Spot values by hand: channel 0, row 3 holds b alone; channel 1 holds a alone, zero on the last row/column.
    assert add_prev(a, b)[0, 0, 3, 0].item() == 1300.0 and add_prev(a, b)[0, 0, 0, 0].item() == 101.0
    assert add_prev(a, b)[0, 1, 2, 2].item() == 18.0 and add_prev(a, b)[0, 1, 3, 3].item() == 0.0


def test_equal_shapes_are_a_plain_sum():
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(add_prev(a, b), a + b)


def test_stage_shapes_and_names():
    model = dlib_resnet29().eval()
    shapes = []
    x = torch.zeros(2, 3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE)
    with torch.no_grad():
        for stage in model.stages():
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
        features = model(torch.zeros(2, 3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE))
    # 150 -> 7x7/2 -> 72 -> 3x3/2 max-pool -> 35; then each downsampling stage: 3x3/2 unpadded conv (35 -> 17 -> 8
    # -> 3 -> 1) beside a 2x2/2 average pool (35 -> 17 -> 8 -> 4 -> 2): add_prev keeps the larger map.
    assert shapes == [(32, 35, 35), (32, 35, 35), (64, 17, 17), (128, 8, 8), (256, 4, 4), (256, 2, 2)]
    assert features.shape == (2, 256)
    assert [name for name, _ in model.named_children()] == ["stem", "layer1", "layer2", "layer3", "layer4", "layer5"]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 29


def test_affine_layers_have_no_batch_statistics():
    model = dlib_resnet29()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, Affine) for m in model.modules()) == 29
    x = torch.randn(3, 3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE)
    with torch.no_grad():
        train_mode = model.train()(x)
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(3)])
        eval_mode = model.eval()(x)
    # No batch statistics: train and eval mode compute the same, and a sample's output ignores the others.
    # 1e-5: the same float32 arithmetic, only the convolution's blocking over the batch can differ.
    assert torch.allclose(train_mode, eval_mode, atol=1e-5, rtol=0)
    assert torch.allclose(one_by_one, eval_mode, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parity with dlib


def _face_chip(path) -> np.ndarray:
    """dlib's 150 px chip of the photo's face: siamkit's detector and 5 landmarks, dlib's get_face_chip."""
    from siamkit.faces.detect import detect_faces

    image = Image.open(path)
    faces = detect_faces(image)
    assert faces, f"no face found in {path}"
    face = max(faces, key=lambda f: f.area)
    rect = dlib.rectangle(*(int(round(v)) for v in face.box))
    points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
    shape = dlib.full_object_detection(rect, points)
    return dlib.get_face_chip(np.asarray(image.convert("RGB")), shape, size=DLIB_CHIP_SIZE, padding=0.25)


@pytest.fixture(scope="module")
def chips(data_root) -> np.ndarray:
    """[N, 150, 150, 3] uint8: 16 faces of 8 people, then random pixels."""
    faces = [_face_chip(data_root / p) for p in ATT_PHOTOS + ROF_PHOTOS]
    noise = np.random.default_rng(0).integers(0, 256, (N_RANDOM_CHIPS, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3), np.uint8)
    return np.concatenate([np.stack(faces), noise])


@pytest.fixture(scope="module")
def dlib_descriptors(chips) -> np.ndarray:
    from siamkit.models.dlib_weights import dlib_model_path

    model = dlib.face_recognition_model_v1(str(dlib_model_path()))
    return np.stack([np.array(model.compute_face_descriptor(chip, num_jitters=0)) for chip in chips])


@pytest.fixture(scope="module")
def torch_descriptors(chips) -> np.ndarray:
    from siamkit.models.dlib_weights import load_dlib_state_dict

    model = DlibDescriptor().eval()
    model.load_state_dict(load_dlib_state_dict())
    batch = torch.from_numpy(chips).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(batch).double().numpy()


# Both sides compute in float32 with different summation orders (dlib's own convolution code, oneDNN here), so
# they agree to float32 rounding grown through 29 convolutions: a few 1e-7 on descriptor entries of about 0.1-0.4.
# 1e-4 (the issue's bound) leaves more than 100x room for other CPUs' kernels; a wrong layer (padding, add_prev's
# alignment, a transposed fc, an affine as BatchNorm) moves entries by 1e-2 or more.
MAX_ABS_DIFF = 1e-4


def test_descriptors_match_dlib(chips, dlib_descriptors, torch_descriptors):
    assert len(chips) >= 20
    assert torch_descriptors.shape == dlib_descriptors.shape == (len(chips), 128)
    assert np.abs(torch_descriptors - dlib_descriptors).max() < MAX_ABS_DIFF


def test_same_person_decisions_match_dlib(dlib_descriptors, torch_descriptors):
    # dlib calls a pair the same person below distance 0.6. Two descriptors each off by at most MAX_ABS_DIFF per
    # entry move a distance by at most 2 * sqrt(128) * MAX_ABS_DIFF (triangle inequality); at the few 1e-7 that
    # float32 reordering gives (see above) that bound is below 1e-4, so only pairs within 1e-4 of 0.6 may flip.
    pairs = list(itertools.combinations(range(len(dlib_descriptors)), 2))
    d_dlib = np.array([np.linalg.norm(dlib_descriptors[i] - dlib_descriptors[j]) for i, j in pairs])
    d_torch = np.array([np.linalg.norm(torch_descriptors[i] - torch_descriptors[j]) for i, j in pairs])
    decided = np.abs(d_dlib - DLIB_SAME_PERSON_DISTANCE) > 1e-4
    assert np.array_equal((d_dlib < DLIB_SAME_PERSON_DISTANCE)[decided], (d_torch < DLIB_SAME_PERSON_DISTANCE)[decided])
    # The chips hold both kinds of decision (genuine pairs among the photos), so the comparison is not vacuous.
    assert 0 < (d_dlib < DLIB_SAME_PERSON_DISTANCE).sum() < len(pairs)


def test_backbone_alone_gives_the_features_under_the_descriptor(chips):
    from siamkit.models.dlib_weights import load_dlib_state_dict

    state = load_dlib_state_dict()
    whole, backbone = DlibDescriptor().eval(), DlibFaceResNet().eval()
    whole.load_state_dict(state)
    backbone.load_state_dict(backbone_state(state))
    batch = torch.from_numpy(chips[:2]).permute(0, 3, 1, 2)
    normalised = (batch.float() - torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1)) / 256
    with torch.inference_mode():
        # Same arithmetic on both paths except the final matrix product: float32 rounding of a 256-term sum.
        assert torch.allclose(whole(batch), backbone(normalised) @ state["fc.weight"].T, atol=1e-6, rtol=0)


def test_traces_without_warnings_and_computes_the_same():
    # torch.jit.trace (siamkit export --format torchscript): add_prev's pads must be the trace's constants, read
    # without the tracer's warnings; the traced graph runs the same float32 operations as the eager model.
    import warnings

    model = DlibDescriptor().eval()
    generator = torch.Generator().manual_seed(0)
    chips = torch.randint(0, 256, (2, 3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE), dtype=torch.uint8, generator=generator)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, chips)
        assert torch.equal(traced(chips[:1]), model(chips[:1]))
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
