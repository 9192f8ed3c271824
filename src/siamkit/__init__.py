"""siamkit: train and evaluate Siamese networks for verification."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a run folder or checkpoint file and return a :class:`siamkit.api.Verifier`."""
    from .api import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
