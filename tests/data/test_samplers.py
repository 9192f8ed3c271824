import numpy as np
import pytest

from siamkit.data.samplers import PKSampler, TupleSampler
from siamkit.errors import SiamkitError

# 5 identities with 4, 3, 1, 6, 2 images (identity 2 has a single image: never an anchor).
LABELS = np.array([0] * 4 + [1] * 3 + [2] + [3] * 6 + [4] * 2)


def test_triplets_are_valid_and_deterministic():
    s = TupleSampler(LABELS, n_branches=3, batch_size=4, seed=7)
    for step in range(20):
        a, p, n = s.batch(step)
        assert (LABELS[a] == LABELS[p]).all() and (a != p).all()
        assert (LABELS[a] != LABELS[n]).all()
        assert (LABELS[a] != 2).all()
        np.testing.assert_array_equal(s.batch(step), TupleSampler(LABELS, 3, 4, seed=7).batch(step))
    assert not np.array_equal(s.batch(0), TupleSampler(LABELS, 3, 4, seed=8).batch(0))


def test_pairs_are_half_genuine_half_impostor():
    s = TupleSampler(LABELS, n_branches=2, batch_size=6, seed=0)
    a, b = s.batch(0)
    same = LABELS[a] == LABELS[b]
    np.testing.assert_array_equal(same, [True] * 3 + [False] * 3)
    assert (a[:3] != b[:3]).all()


def test_an_epoch_visits_every_anchor_once():
    s = TupleSampler(LABELS, n_branches=3, batch_size=3, seed=1)
    usable = np.flatnonzero(LABELS != 2)  # 15 images with a positive
    assert s.steps_per_epoch == 15 // 3
    anchors = np.concatenate([s.batch(step)[0] for step in range(s.steps_per_epoch)])
    np.testing.assert_array_equal(np.sort(anchors), usable)


def test_ranks_split_an_epoch_without_overlap():
    ranks = [TupleSampler(LABELS, 3, 2, seed=3, rank=r, world=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == 15 // 4
    seen = [np.concatenate([r.batch(step)[0] for step in range(r.steps_per_epoch)]) for r in ranks]
    assert not set(seen[0]) & set(seen[1])


def test_pk_batches():
    s = PKSampler(LABELS, p=2, k=3, seed=0)
    for step in range(10):
        idx = s.batch(step).reshape(-1)
        assert idx.shape == (6,)
        groups = LABELS[idx].reshape(2, 3)
        assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
        assert 2 not in groups
    # identity 4 has 2 < K images: drawn with replacement; others without.
    ranks = [PKSampler(LABELS, p=2, k=2, seed=5, rank=r, world=2).batch(0).reshape(-1) for r in range(2)]
    assert not set(LABELS[ranks[0]]) & set(LABELS[ranks[1]])


def test_impossible_batches_are_refused():
    with pytest.raises(SiamkitError, match="--batch-size"):
        TupleSampler(LABELS, 3, batch_size=100, seed=0)
    with pytest.raises(SiamkitError, match="--identities-per-batch"):
        PKSampler(LABELS, p=5, k=2, seed=0)  # only 4 identities have 2+ images
    with pytest.raises(SiamkitError, match="2 images"):
        TupleSampler(np.array([0, 1, 2]), 3, 1, seed=0)


def test_pk_sampler_holds_arrays_not_per_identity_objects_at_2m_identities():
    """2M identities x 2 images: the sampler's state is a few numpy arrays, O(images) bytes, no per-identity objects."""
    import tracemalloc

    n_identities, images = 2_000_000, 4_000_000
    labels = np.repeat(np.arange(n_identities, dtype=np.int64), 2)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        sampler = PKSampler(labels, p=64, k=4, seed=0)
        _, peak = tracemalloc.get_traced_memory()
        grown = tracemalloc.take_snapshot().compare_to(before, "filename")
    finally:
        tracemalloc.stop()
    for holder in (sampler, sampler.index):
        for name, value in vars(holder).items():
            assert isinstance(value, (int, float, np.ndarray, type(sampler.index))), (name, type(value))
    # Live allocations made by the constructor: a handful of array buffers. One Python object per identity would
    # be millions of blocks (and >= 2M x 28 bytes even for plain ints).
    assert sum(s.count_diff for s in grown) < 200
    # Its arrays: the images sorted by identity (8 bytes an image) and three per-identity arrays (counts, starts,
    # usable: 8 bytes an identity each); peak: one more temporary of each kind while sorting and summing.
    held = 8 * images + 3 * 8 * n_identities
    assert sum(s.size_diff for s in grown) <= held + 4096
    assert peak <= held + 8 * images + 2 * 8 * n_identities
    batch = sampler.batch(3)
    assert batch.shape == (1, 64 * 4) and len(np.unique(labels[batch])) == 64
