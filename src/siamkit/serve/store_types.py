"""What every gallery Store shares (store.py: SQLite; store_pg.py: PostgreSQL): the ModelStamp a gallery records,
a Change of its log, and StoreUnavailable."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SiamkitError
from ..gallery import PROBE_TOLERANCE

# (op "add"|"del", image id, identity, embedding float32 [d] for "add", None for "del")
Change = tuple[str, int, str, "np.ndarray | None"]


class StoreUnavailable(Exception):
    """The backing database is unreachable (answered with HTTP 503; the request may be retried)."""


@dataclass(frozen=True)
class ModelStamp:
    """The model a gallery was enrolled with: its embeddings mean nothing to another model."""

    name: str  # the model argument as given: a run path, an .onnx file, "dlib"
    dim: int
    score: str  # "cosine" or "euclidean"
    probe: bytes  # float32 bytes of gallery.model_probe's embedding

    def same_model(self, other: "ModelStamp") -> bool:
        """Same dimension and score, and probe embeddings within gallery.py's tolerance (a run and its ONNX export
        agree to 1e-4; another model differs by far more)."""
        if (self.dim, self.score) != (other.dim, other.score) or len(self.probe) != len(other.probe):
            return False
        a, b = np.frombuffer(self.probe, np.float32), np.frombuffer(other.probe, np.float32)
        return bool(np.abs(a - b).max() <= PROBE_TOLERANCE)


def refuse_other_model(gallery: str, stored: ModelStamp, model: ModelStamp) -> None:
    """One line naming both models when ``gallery`` was enrolled with another model than ``model``."""
    if not stored.same_model(model):
        raise SiamkitError(f"gallery {gallery!r} was enrolled with another model ({stored.name}, dimension "
                           f"{stored.dim}, {stored.score}), not {model.name}; serve it with that model, or enroll "
                           f"into another gallery")
