"""Streamed batches: the prefetcher gives each step exactly the images the sampler names, reading ahead."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from siamkit.data.cache import ImageRows
from siamkit.data.prefetch import BatchPrefetcher


def _indices(step: int) -> np.ndarray:
    return np.random.default_rng([3, step]).integers(0, 50, 6)  # a pure function of the step, like the samplers


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (50, 3, 4, 5), dtype=np.uint8)


def test_each_step_gets_the_images_the_sampler_names_from_any_start(images):
    seen: list[int] = []
    lock = threading.Lock()

    def indices(step: int) -> np.ndarray:
        with lock:
            seen.append(step)
        return _indices(step)

    stream = BatchPrefetcher(ImageRows(images), indices, torch.device("cpu"), depth=2)
    try:
        for step in [7, 8, 9, 10, 3, 4]:  # a resumed run starts anywhere; a jump back still reads the right step
            expected = torch.from_numpy(images[_indices(step)])
            assert torch.equal(stream.get(step), expected)
    finally:
        stream.close()
    assert {8, 9, 10, 11, 12} <= set(seen)  # steps were read before they were asked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and non-blocking copies need CUDA")
def test_on_cuda_the_batch_arrives_on_the_gpu(images):
    stream = BatchPrefetcher(ImageRows(images), _indices, torch.device("cuda"))
    try:
        x = stream.get(0)
        assert x.is_cuda and torch.equal(x.cpu(), torch.from_numpy(images[_indices(0)]))
        assert stream._pending[1].result().is_pinned()
    finally:
        stream.close()
