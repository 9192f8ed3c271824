"""siamkit: train and evaluate Siamese networks for verification."""
from ._version import __version__


def load(path, device="cpu"):
    """Load a run folder or checkpoint file (a :class:`siamkit.api.Verifier`), or an exported .onnx file
    (a :class:`siamkit.exported.ExportedVerifier`, run by onnxruntime without importing torch)."""
    from .exported import is_exported, load_exported

    if is_exported(path):
        return load_exported(path)
    from .api import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
