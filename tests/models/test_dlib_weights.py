"""The reader of dlib's model file: on a small network written here by a serializer of dlib's format, on the
installed file, its refusals (one line naming the file), and the cache of the converted weights.

The serializer below follows dlib/serialize.h, dlib/cuda/tensor.h and the serialize functions of dlib/dnn (core.h,
layers.h, loss.h, input.h) independently of siamkit's reader: it writes the newest record versions (con_6,
affine_2, relu_2, fc_3) while the installed file holds the older ones (con_4, affine_, relu_, fc_2).
"""
from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from siamkit.errors import SiamkitError
from siamkit.models import dlib_weights
from siamkit.models.dlib_resnet import DlibDescriptor
from siamkit.models.dlib_weights import (
    DLIB_MODEL_SHA256, dlib_cache_path, dlib_model_path, load_dlib_state_dict, read_dlib_network,
)

if importlib.util.find_spec("face_recognition_models") is None:  # importing it needs pkg_resources: look it up only
    pytest.skip("face-recognition-models (the align extra) is not installed", allow_module_level=True)

# ---------------------------------------------------------------- dlib's encodings


def enc_int(value: int) -> bytes:
    """Control byte (0x80 if negative | byte count) then |value| little-endian, at least one byte."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def enc_float(value: float) -> bytes:
    """Mantissa then exponent (value = mantissa * 2**exponent), each an integer."""
    numerator, denominator = float(value).as_integer_ratio()  # the denominator is a power of two
    return enc_int(numerator) + enc_int(-(denominator.bit_length() - 1))


def enc_bool(value: bool) -> bytes:
    return b"1" if value else b"0"


def enc_str(text: str) -> bytes:
    return enc_int(len(text)) + text.encode()


def enc_tensor(array: np.ndarray) -> bytes:
    shape = tuple(array.shape) + (1,) * (4 - array.ndim)
    return enc_int(2) + b"".join(enc_int(d) for d in shape) + array.astype("<f4").tobytes()


def enc_alias(*shape: int) -> bytes:
    return enc_int(1) + b"".join(enc_int(d) for d in shape)


EMPTY = enc_tensor(np.zeros((0, 0, 0, 0), np.float32))


def test_encodings_by_hand():
    assert enc_int(0) == b"\x01\x00" and enc_int(300) == b"\x02\x2c\x01" and enc_int(-5) == b"\x81\x05"
    assert enc_float(0.75) == b"\x01\x03" + b"\x81\x02"  # 3 * 2**-2


# ---------------------------------------------------------------- a small network of dlib's structure


class TinyNet:
    """loss_metric<fc_no_bias<2, avg_pool_everything<ares_down<3, ares<2 (x blocks), max_pool<3,3,2,2,
    relu<affine<con<2,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>, with random weights."""

    STEM, STAGES, DESCRIPTOR = 2, ((2, 1, False), (3, 1, True)), 2

    def __init__(self, layer1_blocks: int = 1, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.expected: dict[str, np.ndarray] = {}  # the state dict the reader should return
        records = self.con("stem.conv", 2, 3, 7, 2, 0)
        records += [self.affine("stem.affine", 2), self.relu(), self.pool("max_pool", 3, 2)]
        for j in range(layer1_blocks):
            records += self.block(f"layer1.{j}", 2, 2, down=False)
        records += self.block("layer2.0", 2, 3, down=True)
        self.records = records + [self.pool("avg_pool", 0, 1), self.fc(3, 2)]  # innermost first

    def con(self, key, out, inp, k, stride, pad):
        filters, biases = self.rng.standard_normal((out, inp, k, k)), self.rng.standard_normal(out)
        self.expected[f"{key}.weight"], self.expected[f"{key}.bias"] = filters, biases
        body = (enc_str("con_6") + enc_tensor(np.concatenate([filters.ravel(), biases])) + enc_int(out)
                + enc_int(k) + enc_int(k) + enc_int(stride) * 2 + enc_int(pad) * 2 + enc_alias(out, inp, k, k)
                + enc_alias(1, out, 1, 1) + enc_float(1.0) * 3 + enc_float(0.0) + enc_bool(True) + enc_bool(False))
        return [("layer", body)]

    def affine(self, key, channels):
        gamma, beta = self.rng.standard_normal(channels), self.rng.standard_normal(channels)
        self.expected[f"{key}.weight"], self.expected[f"{key}.bias"] = gamma, beta
        return ("layer", enc_str("affine_2") + enc_tensor(np.concatenate([gamma, beta])) + enc_alias(1, channels, 1, 1)
                + enc_alias(1, channels, 1, 1) + enc_int(0) + enc_bool(False))

    @staticmethod
    def relu():
        return "layer", enc_str("relu_2") + enc_bool(False)

    @staticmethod
    def pool(kind, window, stride):
        return "layer", enc_str(f"{kind}_2") + enc_int(window) * 2 + enc_int(stride) * 2 + enc_int(0) * 2

    def block(self, prefix, inp, out, down):
        stride, pad = (2, 0) if down else (1, 1)
        records = [("tag", b"")] + self.con(f"{prefix}.conv1", out, inp, 3, stride, pad)
        records += [self.affine(f"{prefix}.affine1", out), self.relu()]
        records += self.con(f"{prefix}.conv2", out, out, 3, 1, 1) + [self.affine(f"{prefix}.affine2", out)]
        if down:
            records += [("tag", b""), ("skip", b""), self.pool("avg_pool", 2, 2)]
        return records + [("layer", enc_str("add_prev_")), self.relu()]

    def fc(self, inputs, outputs):
        matrix = self.rng.standard_normal((inputs, outputs))  # dlib's layout: inputs x outputs
        self.expected["fc.weight"] = matrix.T
        return ("layer", enc_str("fc_3") + enc_int(outputs) + enc_int(inputs) + enc_tensor(matrix)
                + enc_alias(inputs, outputs, 1, 1)
                + enc_alias(0, 0, 0, 0) + enc_int(1) + enc_float(1.0) * 3 + enc_float(0.0) + enc_bool(True))

    def file_bytes(self, innermost_version: int = 3) -> bytes:
        """Version 3 of the innermost record (dlib 19.x) ends with a sample expansion factor; version 2 does not."""
        head = enc_int(1) + enc_str("loss_metric_2") + enc_float(0.04) + enc_float(0.6)
        kinds = [kind for kind, _ in reversed(self.records)]
        versions = [1 if kind != "layer" else innermost_version if i == len(kinds) - 1 else 2
                    for i, kind in enumerate(kinds)]
        head += b"".join(enc_int(v) for v in versions)
        mean = (122.782, 117.001, 104.298)  # dlib's float members, written as floats
        head += enc_str("input_rgb_image_sized") + b"".join(enc_float(np.float32(m)) for m in mean)
        head += enc_int(150) * 2
        layers = [body for kind, body in self.records if kind == "layer"]
        factor = enc_int(1) if innermost_version == 3 else b""
        tail = b"".join(body + b"100" + EMPTY * 3 + (factor if i == 0 else b"") for i, body in enumerate(layers))
        return head + tail


def write(tmp_path, data: bytes, name: str = "tiny.dat"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_tiny(path, data: bytes):
    return read_dlib_network(path, sha256=hashlib.sha256(data).hexdigest(), stem_channels=TinyNet.STEM,
                             stages=TinyNet.STAGES, descriptor_size=TinyNet.DESCRIPTOR)


@pytest.mark.parametrize("innermost_version", [2, 3])
def test_reads_a_small_network_written_in_dlibs_format(tmp_path, innermost_version):
    net = TinyNet()
    data = net.file_bytes(innermost_version)
    state = read_tiny(write(tmp_path, data), data)
    assert set(state) == set(net.expected)
    for key, value in net.expected.items():
        assert torch.equal(state[key], torch.from_numpy(value.astype(np.float32))), key
    model = DlibDescriptor(TinyNet.STEM, TinyNet.STAGES, TinyNet.DESCRIPTOR)
    model.load_state_dict(state)  # strict: every parameter of the network, nothing else


def assert_one_line_error(error: pytest.ExceptionInfo, path, *words: str):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


def test_refuses_a_truncated_file(tmp_path):
    data = TinyNet().file_bytes()[:-7]
    path = write(tmp_path, data)
    with pytest.raises(SiamkitError) as error:
        read_tiny(path, data)
    assert_one_line_error(error, path, "ends early")


def test_refuses_bytes_after_the_last_record(tmp_path):
    data = TinyNet().file_bytes() + b"\x00"
    path = write(tmp_path, data)
    with pytest.raises(SiamkitError) as error:
        read_tiny(path, data)
    assert_one_line_error(error, path, "1 bytes after the last record")


def test_refuses_a_wrong_layer_count(tmp_path):
    data = TinyNet(layer1_blocks=2).file_bytes()  # one residual block more than the reader expects
    path = write(tmp_path, data)
    with pytest.raises(SiamkitError) as error:
        read_tiny(path, data)
    assert_one_line_error(error, path, "not the dlib face model", "reinstall")


def test_refuses_a_changed_file(tmp_path):
    data = bytearray(dlib_model_path().read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    path = write(tmp_path, bytes(data), "dlib_face_recognition_resnet_model_v1.dat")
    with pytest.raises(SiamkitError) as error:
        read_dlib_network(path)
    assert_one_line_error(error, path, "sha256", "altered", "pip install --force-reinstall face-recognition-models")


def test_the_installed_file_gives_the_whole_descriptor():
    state = read_dlib_network(dlib_model_path())
    model = DlibDescriptor()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state["stem.conv.weight"].shape == (32, 3, 7, 7) and state["fc.weight"].shape == (128, 256)


def test_missing_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(SiamkitError, match=r'pip install "siamkit\[align\]"'):
        dlib_model_path()


# ---------------------------------------------------------------- the cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIAMKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def from_file() -> dict[str, torch.Tensor]:
    return read_dlib_network(dlib_model_path())


def assert_same_state(a, b):
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_is_written_under_the_cache_dir_and_read_back(cache_dir, from_file, monkeypatch):
    assert_same_state(load_dlib_state_dict(), from_file)
    assert dlib_cache_path() == cache_dir / "models" / "dlib" / f"weights-{DLIB_MODEL_SHA256[:16]}.pt"
    assert dlib_cache_path().is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the weights")

    monkeypatch.setattr(dlib_weights, "read_dlib_network", no_conversion)
    assert_same_state(load_dlib_state_dict(), from_file)


def test_damaged_cache_is_converted_again(cache_dir, from_file, capsys):
    load_dlib_state_dict()
    stored = torch.load(dlib_cache_path(), weights_only=True)
    stored["state"]["fc.weight"][0, 0] += 1.0  # a changed tensor under the old hash of the tensors
    torch.save(stored, dlib_cache_path())
    assert_same_state(load_dlib_state_dict(), from_file)
    assert "damaged" in capsys.readouterr().err
    dlib_cache_path().write_bytes(b"not a torch file")
    assert_same_state(load_dlib_state_dict(), from_file)
    assert_same_state(torch.load(dlib_cache_path(), weights_only=True)["state"], from_file)  # rewritten intact


def test_altered_model_file_is_refused_even_when_cached(cache_dir, tmp_path, monkeypatch):
    load_dlib_state_dict()
    data = bytearray(dlib_model_path().read_bytes())
    data[-1] ^= 0x01
    altered = write(tmp_path, bytes(data), "dlib_face_recognition_resnet_model_v1.dat")
    monkeypatch.setattr(dlib_weights, "dlib_model_path", lambda: altered)
    with pytest.raises(SiamkitError) as error:
        load_dlib_state_dict()
    assert_one_line_error(error, altered, "sha256")


def test_unwritable_cache_costs_a_warning(tmp_path, monkeypatch, from_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SIAMKIT_CACHE_DIR", str(blocker / "cache"))
    assert_same_state(load_dlib_state_dict(), from_file)
    assert "stay uncached" in capsys.readouterr().err
