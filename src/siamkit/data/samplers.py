"""Which images make up each training step.

Every sampler is a pure function of (seed, step, rank): the same step always draws the same
images, so a resumed run continues exactly, and ranks of a distributed run never overlap.
"""
from __future__ import annotations

import numpy as np

from ..errors import SiamkitError


class _IdentityIndex:
    """Images grouped by identity, for drawing positives and negatives with numpy alone."""

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n_identities = int(self.labels.max()) + 1 if len(self.labels) else 0
        order = np.argsort(self.labels, kind="stable")
        self.by_identity = order  # image indices sorted by identity
        self.counts = np.bincount(self.labels, minlength=self.n_identities)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def random_image_of(self, identities: np.ndarray, rng: np.random.Generator, exclude: np.ndarray | None = None):
        """One random image of each given identity (a different one than ``exclude`` where given)."""
        counts = self.counts[identities]
        if exclude is None:
            offset = (rng.random(len(identities)) * counts).astype(np.int64)
        else:
            # Draw among the other count-1 images, then step over the excluded one.
            pos_of_excluded = self.position[exclude]
            offset = (rng.random(len(identities)) * (counts - 1)).astype(np.int64)
            offset += offset >= pos_of_excluded
        return self.by_identity[self.starts[identities] + offset]

    @property
    def position(self) -> np.ndarray:
        """Position of each image within its identity's block of ``by_identity``."""
        if not hasattr(self, "_position"):
            pos = np.empty(len(self.labels), dtype=np.int64)
            pos[self.by_identity] = np.arange(len(self.labels)) - np.repeat(self.starts, self.counts)
            self._position = pos
        return self._position

    def other_identities(self, identities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random identity different from each given one."""
        other = (rng.random(len(identities)) * (self.n_identities - 1)).astype(np.int64)
        return other + (other >= identities)


class TupleSampler:
    """Explicit tuples: pairs (half genuine, half impostor) or (anchor, positive, negative) triplets.

    An epoch visits every image that has a positive once as an anchor, in a seeded random order.
    ``batch(step)`` returns image indices shaped [n_branches, batch_size], branch-major.
    """

    def __init__(self, labels: np.ndarray, n_branches: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_branches not in (2, 3):
            raise ValueError("n_branches must be 2 (pairs) or 3 (triplets)")
        self.index = _IdentityIndex(labels)
        if self.index.n_identities < 2:
            raise SiamkitError("training data needs at least 2 identities")
        self.anchors = np.flatnonzero(self.index.counts[self.index.labels] >= 2)
        if len(self.anchors) == 0:
            raise SiamkitError("no identity in the training data has 2 images; genuine pairs need 2+ per identity")
        self.n_branches, self.batch_size, self.seed = n_branches, batch_size, seed
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(self.anchors) // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise SiamkitError(
                f"--batch-size {batch_size} x {world} process(es) is larger than the {len(self.anchors)} usable "
                f"anchor images; pass a smaller --batch-size"
            )

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.anchors)
        start = (pos * self.world + self.rank) * self.batch_size
        anchors = order[start : start + self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, pos, self.rank, 1])
        labels = self.index.labels[anchors]
        positives = self.index.random_image_of(labels, rng, exclude=anchors)
        negatives = self.index.random_image_of(self.index.other_identities(labels, rng), rng)
        if self.n_branches == 3:
            return np.stack([anchors, positives, negatives])
        # Pairs: the first half genuine, the rest impostor.
        half = self.batch_size // 2
        second = np.concatenate([positives[:half], negatives[half:]])
        return np.stack([anchors, second])


class PKSampler:
    """PK batches: P random identities x K random images each (``batch(step)`` -> [P*K] indices).

    Identities with fewer than K images contribute repeated images (drawn with replacement);
    identities with a single image are never chosen. Ranks get disjoint identities. An epoch is len(usable images) // (P*K*world) steps.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, rank: int = 0, world: int = 1):
        self.index = _IdentityIndex(labels)
        self.usable = np.flatnonzero(self.index.counts >= 2)
        if p * world > len(self.usable):
            raise SiamkitError(
                f"--identities-per-batch {p} x {world} process(es) is more than the {len(self.usable)} training "
                f"identities with 2+ images; pass a smaller P"
            )
        self.p, self.k, self.seed, self.rank, self.world = p, k, seed, rank, world
        n_images = int(self.index.counts[self.usable].sum())
        self.steps_per_epoch = max(1, n_images // (p * k * world))

    def batch(self, step: int) -> np.ndarray:
        # Every rank draws the same P*world identities and keeps its own P: no identity is on two ranks.
        rng = np.random.default_rng([self.seed, step, 2])
        identities = rng.choice(self.usable, size=self.p * self.world, replace=False)
        out = np.empty((len(identities), self.k), dtype=np.int64)
        for row, ident in enumerate(identities):
            start, count = self.index.starts[ident], self.index.counts[ident]
            pick = rng.choice(count, size=self.k, replace=count < self.k)
            out[row] = self.index.by_identity[start + pick]
        return out[self.rank * self.p : (self.rank + 1) * self.p].reshape(1, -1)
