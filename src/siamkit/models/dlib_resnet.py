"""dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1) in PyTorch.

Written from the network's published definition (dlib's examples/dnn_face_recognition_ex.cpp) and the
semantics of dlib's layers (dlib/dnn/layers.h), so that dlib's own weights (models/dlib_weights.py) give
dlib's descriptors. What differs from a torchvision ResNet, each checked by the parity test:

- input: 150x150 RGB, (x - DLIB_MEAN_RGB) / 256 on 0-255 pixels (dlib's input_rgb_image_sized);
- stem: 7x7 convolution, stride 2, no padding, 32 filters with biases -> affine -> ReLU -> 3x3 max-pool, stride 2,
  no padding (150 -> 72 -> 35);
- stages of 32 (3 blocks), 64 (a downsampling block + 3), 128 (down + 2), 256 (down + 2), 256 (down); a block is
  3x3 conv with bias -> affine -> ReLU -> 3x3 conv with bias -> affine, stride-1 convolutions pad by 1 and stride-2
  ones by 0; a downsampling block's shortcut is a 2x2 average pool (stride 2) of its input, with fewer channels;
- the residual sum is dlib's add_prev: the operands are aligned at index 0 and the smaller one is zero-padded at the
  end of channels and of space (in the last two stages 3x3 meets 4x4, then 1x1 meets 2x2), then ReLU;
- global average pooling to 256 features; DlibDescriptor adds the 256 -> 128 linear layer without bias, whose
  output (not normalised) dlib compares by Euclidean distance, the same person below 0.6;
- "affine" layers are BatchNorm folded into a per-channel scale and shift when dlib's model was saved: there are no
  batch statistics, in training too, so they are not BatchNorm modules and the BN policies never touch them.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

DLIB_CHIP_SIZE = 150
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)  # dlib's input layer subtracts these (stored in the model file) ...
DLIB_INPUT_SCALE = 256.0  # ... and divides by this
DLIB_SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two descriptors
DESCRIPTOR_SIZE = 128
FEATURE_SIZE = 256
STEM_CHANNELS = 32
# (channels, blocks, whether the first block downsamples) of layer1 .. layer5, in forward order.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class Affine(nn.Module):
    """dlib's affine layer: y = weight[c] * x + bias[c] per channel; no batch statistics, in training too."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # addcmul is one pass over the map (x * w + b would be two) and keeps x's memory format.
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}"


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger extent of each dimension, the smaller operand zero-padded at the end.

    The pad amounts are Python ints from the operands' shapes, so an export sees plain F.pad calls of fixed sizes.
    """
    a_shape, b_shape = _sizes(a), _sizes(b)
    channels, height, width = (max(a_shape[i], b_shape[i]) for i in (1, 2, 3))
    return _pad_to(a, a_shape, channels, height, width) + _pad_to(b, b_shape, channels, height, width)


def _sizes(x: torch.Tensor) -> tuple[int, ...]:
    if not torch.jit.is_tracing():
        return tuple(x.shape)
    # torch.jit.trace records sizes as tensors and warns when Python reads them. The network takes fixed-size
    # chips (DLIB_CHIP_SIZE, as dlib's does), so the pads are meant to be constants of the trace.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(d) for d in x.shape)


def _pad_to(x: torch.Tensor, shape: tuple[int, ...], channels: int, height: int, width: int) -> torch.Tensor:
    pad = (0, width - shape[3], 0, height - shape[2], 0, channels - shape[1])
    return F.pad(x, pad) if any(pad) else x


class Stem(nn.Module):
    """7x7 stride-2 convolution (no padding) -> affine -> ReLU -> 3x3 stride-2 max-pool (no padding)."""

    def __init__(self, channels: int = STEM_CHANNELS):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 7, stride=2, padding=0)
        self.affine = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, stride=2)


class ResidualBlock(nn.Module):
    """dlib's ares (stride 1, identity shortcut) or ares_down (stride 2, 2x2 average-pooled shortcut)."""

    def __init__(self, in_channels: int, channels: int, downsample: bool):
        super().__init__()
        stride, padding = (2, 0) if downsample else (1, 1)
        self.downsample = downsample
        self.same_shape = not downsample and in_channels == channels
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=padding)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.downsample:
            return F.relu(add_prev(out, F.avg_pool2d(x, 2, stride=2)))
        if self.same_shape:  # stride 1, padding 1, as many channels in as out: add_prev is a plain sum
            return F.relu(out + x)
        return F.relu(add_prev(out, x))


class DlibFaceResNet(nn.Module):
    """The backbone: normalised [N, 3, 150, 150] -> the 256 globally average-pooled features.

    Child modules ``stem``, ``layer1`` .. ``layer5`` in forward order (for --freeze-until).
    """

    def __init__(self, stem_channels: int = STEM_CHANNELS, stages: tuple[tuple[int, int, bool], ...] = STAGES):
        super().__init__()
        self.stem = Stem(stem_channels)
        self.feature_size = stages[-1][0]
        self.n_stages = len(stages)
        in_channels = stem_channels
        for i, (channels, blocks, downsample) in enumerate(stages, start=1):
            first = ResidualBlock(in_channels, channels, downsample)
            rest = [ResidualBlock(channels, channels, False) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(first, *rest))
            in_channels = channels

    def stages(self) -> list[nn.Module]:
        return [self.stem] + [getattr(self, f"layer{i}") for i in range(1, self.n_stages + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x.mean(dim=(2, 3))


def dlib_resnet29() -> DlibFaceResNet:
    """dlib's face ResNet backbone (29 convolutions), untrained; load dlib's weights with load_dlib_state_dict()."""
    return DlibFaceResNet()


def normalise_dlib_input(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 RGB pixels (uint8 or float) [N, 3, H, W] -> dlib's network input, float32."""
    return (pixels.to(torch.float32) - _mean_pixel(pixels.device)) / DLIB_INPUT_SCALE


def _mean_pixel(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(DLIB_MEAN_RGB, dtype=torch.float32, device=device).view(1, 3, 1, 1)


class DlibDescriptor(DlibFaceResNet):
    """dlib's whole network: uint8 RGB chips [N, 3, 150, 150] -> dlib's 128-d descriptors (not normalised).

    Its state dict is the backbone's keys plus ``fc.weight`` (what read_dlib_network returns). The arguments
    describe smaller networks of the same structure (the reader's tests); the defaults are dlib's.
    """

    def __init__(self, stem_channels: int = STEM_CHANNELS, stages: tuple[tuple[int, int, bool], ...] = STAGES,
                 descriptor_size: int = DESCRIPTOR_SIZE):
        super().__init__(stem_channels, stages)
        self.fc = nn.Linear(self.feature_size, descriptor_size, bias=False)
        # A buffer (not in the state dict) rather than a tensor made per call: a trace records it as the model's.
        self.register_buffer("mean_pixel", _mean_pixel(), persistent=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips.to(torch.float32) - self.mean_pixel) / DLIB_INPUT_SCALE  # as normalise_dlib_input
        return self.fc(super().forward(x))


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's part of a DlibDescriptor state dict (everything but ``fc``)."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
