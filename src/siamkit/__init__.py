"""siamkit: train and evaluate Siamese networks for verification."""
from ._version import __version__


def load(path, device="cpu", align=False):
    """Load a run folder or checkpoint file (a :class:`siamkit.api.Verifier`; align=True: detect and align the face
    of each raw photo first, as `siamkit align` does), or an exported .onnx file (a
    :class:`siamkit.exported.ExportedVerifier`, run by onnxruntime without importing torch)."""
    from .exported import is_exported, load_exported

    if is_exported(path):
        return load_exported(path, align=align)
    from .api import load as _load

    return _load(path, device=device, align=align)


__all__ = ["__version__", "load"]
