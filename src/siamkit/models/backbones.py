"""torchvision backbones with their classification layer removed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models

from ..checkpoint import load_checkpoint, require_finite_model, resolve_checkpoint
from ..errors import SiamkitError
from ..registry import Registry
from .dlib_resnet import FEATURE_SIZE, backbone_state, dlib_resnet29

DLIB_BACKBONE = "dlib-resnet29"  # the backbone --pretrained dlib implies

@dataclass(frozen=True)
class Backbone:
    """A registry entry: a torchvision model name, where its ImageNet classifier sits, its feature width."""

    head_attr: str | None  # attribute holding the ImageNet classifier (replaced by nn.Identity); None: it has none
    width: int  # width of the features the backbone returns
    # Stages in forward order, each with the modules it holds, for --freeze-until; () = none named.
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Builds the model (no weights); None = torchvision's model of the same name, which has ImageNet weights.
    build: Callable[[], nn.Module] | None = None


def flat_map_pool(channels: int, side: int = 4, dropout: float = 0.2) -> nn.Module:
    """Instead of global average pooling: the final map (pooled to side x side) normalised, dropped out and flattened.

    The output layer of ArcFace's ResNets (BN -> dropout -> flatten -> FC): the embedding keeps where on the
    face each feature is, which average pooling throws away. Measured on AT&T: +1.6 points on unseen people
    (experiments/recipe.py, docs/results.md). Its BatchNorm is the backbone's, so the BN
    policies cover it. Adaptive pooling makes the width (channels x side^2) the same for any input size.
    """
    return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.BatchNorm2d(channels), nn.Dropout(dropout), nn.Flatten())


def small_input_resnet(
    width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), flat: bool = False, stem_stride: int = 1
) -> nn.Module:
    """A ResNet for small inputs (32-64 px): a 3x3 stride-1 first convolution and no max-pool.

    torchvision's stem (7x7 stride 2, then a stride-2 max-pool) divides the input by 4 before the first
    block, so a 64x64 face ends on 2x2 maps; this stem keeps the full resolution into layer1, like the
    CIFAR ResNets (He et al. 2016, section 4.2). Stage widths are width, 2x, 4x, 8x (64 = ResNet18's).
    Module names match torchvision's ResNet, so --freeze-until and the CPU tuning treat it the same.
    stem_stride=2 halves the input in the first convolution: a 64x64 input then runs layer1 at 32x32.
    """
    model = models.ResNet(models.resnet.BasicBlock, list(blocks))
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    for i, n in enumerate(blocks):
        setattr(model, f"layer{i + 1}", model._make_layer(models.resnet.BasicBlock, width * 2**i, n, stride=1 if i == 0 else 2))
    model.fc = nn.Linear(width * 2 ** (len(blocks) - 1), 1000)
    if flat:
        model.avgpool = flat_map_pool(width * 2 ** (len(blocks) - 1))
    for m in model.modules():  # torchvision's initialisation, for the layers made here
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


_RESNET_STAGES = (
    ("conv1", ("conv1", "bn1")),
    ("layer1", ("layer1",)),
    ("layer2", ("layer2",)),
    ("layer3", ("layer3",)),
    ("layer4", ("layer4",)),
    ("avgpool", ("avgpool",)),
)
# --backbone NAME -> entry; NAME is also the torchvision model name. ``register_backbone("name", Backbone(...))``
# adds one (its stages are read when used: --freeze-until offers them from then on).
BACKBONES: Registry = Registry("--backbone")
register_backbone = BACKBONES.register

register_backbone("resnet18", Backbone("fc", 512, _RESNET_STAGES))
register_backbone("resnet34", Backbone("fc", 512, _RESNET_STAGES))
register_backbone("resnet50", Backbone("fc", 2048, _RESNET_STAGES))
register_backbone("mobilenet_v3_small", Backbone("classifier", 576))
register_backbone("mobilenet_v3_large", Backbone("classifier", 960))
# Small-input ResNet18s (see small_input_resnet): full width, and a quarter of it for small data sets.
register_backbone("resnet18-small", Backbone("fc", 512, _RESNET_STAGES, build=small_input_resnet))
register_backbone("resnet18-small-w16", Backbone("fc", 128, _RESNET_STAGES, build=lambda: small_input_resnet(width=16)))
# ... with the flattened 4x4 final map as features (flat_map_pool): the faces recipe's backbone.
register_backbone("resnet18-small-w16-flat", Backbone("fc", 128 * 16, _RESNET_STAGES,
                                                      build=lambda: small_input_resnet(width=16, flat=True)))
register_backbone("resnet18-small-w16-flat-s2", Backbone(
    "fc", 128 * 16, _RESNET_STAGES, build=lambda: small_input_resnet(width=16, flat=True, stem_stride=2)))
register_backbone("resnet18-small-w24-flat", Backbone("fc", 192 * 16, _RESNET_STAGES,
                                                      build=lambda: small_input_resnet(width=24, flat=True)))
register_backbone("resnet18-small-w32-flat", Backbone("fc", 256 * 16, _RESNET_STAGES,
                                                      build=lambda: small_input_resnet(width=32, flat=True)))
# dlib's face ResNet (models/dlib_resnet.py): 150x150 RGB chips -> 256 features; --pretrained dlib loads dlib's
# weights, and models/zoo.py's built-in model `dlib` is this backbone with dlib's 128-d layer as its head.
_DLIB_STAGES = tuple((s, (s,)) for s in ("stem", *(f"layer{i}" for i in range(1, 6))))
register_backbone(DLIB_BACKBONE, Backbone(None, FEATURE_SIZE, _DLIB_STAGES, build=dlib_resnet29))


def freeze_stages() -> tuple[str, ...]:
    """Every stage name a registered backbone offers, in forward order: the --freeze-until choices (read when
    used, so that a backbone registered later offers its stages too)."""
    return ("none",) + tuple(dict.fromkeys(name for b in BACKBONES.values() for name, _ in b.stages))


# "Not read yet": the default of a pretrained run's checkpoint that a caller may have read already (read it once).
NOT_READ: object = object()


def build_backbone(name: str, pretrained: str = "none", in_channels: int = 3,
                   pretrained_run: dict | None | object = NOT_READ) -> tuple[nn.Module, int]:
    """A torchvision model without its classifier, and the width of the features it returns.

    ``pretrained_run``: ``siamkit_checkpoint(pretrained)`` when the caller has read it already."""
    entry = BACKBONES.lookup(name)
    run = siamkit_checkpoint(pretrained) if pretrained_run is NOT_READ else pretrained_run
    if pretrained == "dlib":
        model = _dlib_pretrained(name)
    elif run is not None:  # a siamkit run: its backbone, loaded once the model has this run's shape
        model = _without_head(_untrained(name), entry.head_attr)
        if in_channels != 3:
            _set_input_channels(model, in_channels)
        _load_backbone_of_run(model, name, in_channels, pretrained, run)
        return model, entry.width
    elif pretrained == "imagenet":
        if entry.build is not None:
            raise SiamkitError(f"--backbone {name} has no ImageNet weights; pass --pretrained none or a state-dict file")
        model = _download_imagenet(name)
    else:
        model = _untrained(name)
        if pretrained not in ("none", "", None):
            _load_local_weights(model, pretrained, entry.head_attr)
    model = _without_head(model, entry.head_attr)
    if in_channels != 3:
        _set_input_channels(model, in_channels)
    return model, entry.width


def _untrained(name: str) -> nn.Module:
    entry = BACKBONES[name]
    return entry.build() if entry.build is not None else models.get_model(name, weights=None)


def _without_head(model: nn.Module, head_attr: str | None) -> nn.Module:
    if head_attr is not None:
        setattr(model, head_attr, nn.Identity())
    return model


def _dlib_pretrained(name: str) -> nn.Module:
    """dlib's face ResNet with dlib's weights, read from the installed face-recognition-models package."""
    from .dlib_weights import load_dlib_state_dict

    if name != DLIB_BACKBONE:
        raise SiamkitError(f"--pretrained dlib is dlib's face ResNet, --backbone {DLIB_BACKBONE}; drop --backbone "
                           f"{name} (the backbone is implied)")
    model = _untrained(name)
    model.load_state_dict(backbone_state(load_dlib_state_dict()))
    return model


def siamkit_checkpoint(pretrained: str | None) -> dict | None:
    """The checkpoint, if ``pretrained`` names a siamkit run folder or a checkpoint siamkit wrote; else None."""
    if pretrained in (None, "", "none", "imagenet", "dlib"):
        return None
    path = Path(pretrained)
    if path.is_dir():
        return require_finite_model(load_checkpoint(resolve_checkpoint(path)), path)
    if path.is_file() and path.suffix == ".pt":
        try:
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"
            state = torch.load(path, map_location="cpu", weights_only=True) if is_zip else None
        except Exception:
            return None  # not readable as a checkpoint: the state-dict path reports it
        if isinstance(state, dict) and str(state.get("format", "")).startswith("siamkit-checkpoint"):
            # the checks of a siamkit checkpoint (integrity, format version, finite weights)
            return require_finite_model(load_checkpoint(path), path)
    return None


def _load_backbone_of_run(model: nn.Module, name: str, in_channels: int, path: str, ckpt: dict) -> None:
    """Copy a siamkit run's backbone weights (its heads are not used: they start fresh)."""
    spec = ckpt.get("model_spec", {})
    theirs = (spec.get("backbone"), spec.get("in_channels"))
    if theirs != (name, in_channels):
        raise SiamkitError(
            f"--pretrained {path} is a siamkit run of --backbone {theirs[0]} on {theirs[1]} channel(s); this run "
            f"builds {name} on {in_channels}: pass --backbone {theirs[0]}"
            + (" and --grayscale" if theirs[1] == 1 and in_channels != 1 else "")
        )
    state = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SiamkitError(f"--pretrained {path}: its backbone does not fit this one ({str(e).splitlines()[0][:160]})") from None


def _download_imagenet(name: str) -> nn.Module:
    try:
        return models.get_model(name, weights="DEFAULT")
    except Exception as e:  # URLError, ConnectionError, hash mismatch...
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise SiamkitError(
            f"could not download torchvision's ImageNet weights for {name} ({type(e).__name__}: {e}); "
            f"connect to the internet once (they are cached in {cache}), or pass a local state-dict file with "
            f"--pretrained PATH"
        ) from None


def _load_local_weights(model: nn.Module, path: str, head_attr: str | None) -> None:
    """Load a torchvision-format state dict, ignoring its ImageNet classifier entries."""
    if not os.path.isfile(path):
        raise SiamkitError(f"--pretrained {path}: no such file; pass none, imagenet, or a torchvision state-dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SiamkitError(f"--pretrained {path} is not a readable PyTorch state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SiamkitError(f"--pretrained {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = f"{head_attr}."
    state = {k: v for k, v in state.items() if head_attr is None or not k.startswith(head)}
    own = {k for k in model.state_dict() if head_attr is None or not k.startswith(head)}
    missing, unexpected = own - state.keys(), state.keys() - own
    if missing or unexpected:
        example = sorted(missing or unexpected)[:3]
        raise SiamkitError(
            f"--pretrained {path} does not fit this backbone ({len(missing)} missing and {len(unexpected)} "
            f"unexpected entries, e.g. {', '.join(example)}); pass weights of the same torchvision model"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SiamkitError(f"--pretrained {path} has tensors of the wrong shape for this backbone: {str(e)[:200]}") from None


def _set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one with ``in_channels`` inputs (RGB weights summed for greyscale)."""
    parent, attr, conv = _first_conv(model)
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, attr, child
    raise SiamkitError("backbone has no convolution to adapt to greyscale input")


def stage_modules(backbone_name: str, backbone: nn.Module, until: str) -> list[nn.Module]:
    """The backbone modules up to and including stage ``until``."""
    stages = dict(BACKBONES.lookup(backbone_name).stages)
    if not stages:
        raise SiamkitError(f"--freeze-until works with ResNet backbones; {backbone_name} has no named stages")
    if until not in stages:
        raise SiamkitError(f"--freeze-until {until!r} is not a stage; choose one of: {', '.join(stages)}")
    order = list(stages)
    return [getattr(backbone, m) for stage in order[: order.index(until) + 1] for m in stages[stage]]
