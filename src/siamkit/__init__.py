"""siamkit: train and evaluate Siamese networks for verification."""
from ._version import __version__


def load(path, device="cpu", align=False):
    """Load a run folder or checkpoint file and return a :class:`siamkit.api.Verifier` (align=True: detect and
    align the face of each raw photo first, as `siamkit align` does)."""
    from .api import load as _load

    return _load(path, device=device, align=align)


__all__ = ["__version__", "load"]
