"""siamkit: train and evaluate Siamese networks for verification."""
from ._version import __version__


def load(path, device="cpu"):
    """Load a run folder or checkpoint file and return a :class:`siamkit.api.Verifier`."""
    from .api import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
