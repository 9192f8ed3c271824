""".bin validation sets (insightface's lfw.bin, cfp_fp.bin, agedb_30.bin), read through a restricted unpickler.

A .bin is a pickle of ``(images, issame)``: ``images`` holds 2 x len(issame) encoded images (JPEG or PNG), pair i
being images 2i and 2i+1, as ``bytes`` or as numpy uint8 arrays of those bytes (insightface's packing scripts pickle
``cv2.imencode`` output); ``issame`` says whether each pair shows one person. Older packs are Python 2 pickles,
read with ``encoding="bytes"`` as insightface reads them.

A pickle can name any function for the loader to call, so an ordinary ``pickle.load`` of a downloaded file runs
whatever its author wrote. ``SafeUnpickler`` admits only what this format is made of: numpy's reconstruction of an
array (``_reconstruct`` for protocols 0-4, ``_frombuffer`` for protocol 5, with ``numpy.ndarray`` and
``numpy.dtype``), ``bytearray``, and the latin-1 ``_codecs.encode`` with which Python 3 writes bytes at protocol 2;
any other name is refused in one line before anything is called. Lists, tuples, bytes and booleans need no names.
"""
from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SiamkitError

_numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core; its pickles name either


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1); no other codec is looked up."""
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with the codec {encoding!r}")
    return codecs.latin_1_encode(text, errors)[0]


# (module, name) as a pickle spells it -> the object it gets; nothing is imported by name.
ALLOWED: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _numpy_core.multiarray._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _numpy_core.numeric._frombuffer
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,  # Python 2's name
    ("_codecs", "encode"): _latin1_encode,
}


class Refused(pickle.UnpicklingError):
    """A pickle asked for a name that a .bin validation set never holds."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in ALLOWED."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise Refused(f"{module}.{name}") from None


def safe_load(path: str | os.PathLike) -> Any:
    """The object pickled in ``path``, or one error line (a refused name, or not a pickle)."""
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise SiamkitError(f"validation set {path} does not exist; pass the path of a .bin file") from None
    except Refused as e:
        raise SiamkitError(f"{path}: refused to unpickle: it asks for {e}, which a .bin validation set never holds "
                           f"(only images and pair labels); nothing in it was run. Pass an insightface .bin "
                           f"(lfw.bin, cfp_fp.bin, agedb_30.bin) from a source you trust") from None
    except Exception as e:  # a damaged or foreign file: pickle raises many types (EOFError, UnpicklingError, ...)
        raise SiamkitError(f"{path} is not a readable .bin validation set ({type(e).__name__}: {e}); pass an "
                           f"insightface .bin, a pickle of (images, issame)") from None


def read_binset(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N is-same flags) of a .bin validation set, checked: one error line for anything else."""
    loaded = safe_load(path)
    name = Path(path).name
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise SiamkitError(f"{name} holds a {type(loaded).__name__}, not the pair (images, issame) of a .bin "
                           f"validation set; pass an insightface .bin")
    images, issame = loaded
    if isinstance(issame, np.ndarray) and issame.dtype == bool and issame.ndim == 1:
        issame = issame.tolist()
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise SiamkitError(f"{name}: images and issame must be lists; pass an insightface .bin")
    if not issame or len(images) != 2 * len(issame):
        raise SiamkitError(f"{name} holds {len(images)} images for {len(issame)} pairs; a .bin holds two images "
                           f"per pair (and at least one pair)")
    flags = [s for s in issame if isinstance(s, (bool, np.bool_))]
    if len(flags) != len(issame):
        raise SiamkitError(f"{name}: issame holds something other than True/False; pass an insightface .bin")
    return [_image_bytes(image, k, name) for k, image in enumerate(images)], np.array(flags, dtype=bool)


def _image_bytes(image: Any, k: int, name: str) -> bytes:
    """An encoded image as bytes: bytes, bytearray, or a 1-D uint8 numpy array of them."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    # cv2.imencode gives an [N, 1] array
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (1, 2) and image.size == len(image):
        return image.tobytes()
    raise SiamkitError(f"{name}: image {k} is a {type(image).__name__}"
                       + (f" of {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else "")
                       + ", not encoded image bytes (bytes or a uint8 array); pass an insightface .bin")


def contiguous_folds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
    """The fold of each pair in file order: n_folds contiguous blocks, the first n_pairs % n_folds one pair longer
    (scikit-learn's KFold without shuffling, as insightface's verification evaluates a .bin)."""
    if n_pairs < n_folds:
        raise SiamkitError(f"a .bin validation set needs at least {n_folds} pairs for {n_folds}-fold accuracy, "
                           f"got {n_pairs}")
    sizes = np.full(n_folds, n_pairs // n_folds)
    sizes[: n_pairs % n_folds] += 1
    return np.repeat(np.arange(n_folds), sizes)
