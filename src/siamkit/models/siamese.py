"""SiameseNet: one shared backbone, an embedding head and an optional identity classifier."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..batchnorm import POLICIES, bn_layers, get_policy
from ..errors import SiamkitError
from ..options import option
from .backbones import BACKBONES, NOT_READ, build_backbone, freeze_stages, stage_modules
from .heads import ACTIVATIONS, CLASSIFIERS, EmbeddingHead, build_classifier


@dataclass
class ModelOptions:
    """The model's command-line options, declared once: TrainConfig and ModelSpec both consist of them."""

    backbone: str = option("resnet18", group="model", choices=lambda: tuple(BACKBONES),
                           help="the network the embedding head sits on (models/backbones.py's registry)")
    embedding_dim: int = option(128, group="model", minimum="positive", help="size of the embedding")
    embedding_activation: str = option("l2", group="model", choices=ACTIVATIONS,
                                       help="after the embedding's linear layer: l2-normalisation, a sigmoid, or none")
    bn_policy: str = option("joint", group="multi-branch training", choices=lambda: tuple(POLICIES),
                            help="how BatchNorm runs over the branches (docs/guide/batchnorm.md)")
    classifier: str = option("softmax", group="classifier head", choices=lambda: tuple(CLASSIFIERS),
                             help="identity classifier on every branch (models/heads.py's registry), with "
                                  "--classification-weight above 0")
    classifier_input: str = option("features", group="classifier head", choices=("features", "embedding"),
                                   help="what the classifier reads: the backbone's features, or the embedding "
                                        "(as ArcFace/CosFace training does: the margin shapes the embedding itself)")
    scale: float = option(30.0, group="classifier head", help="ArcFace/CosFace scale s")
    class_margin: float = option(0.3, group="classifier head", help="ArcFace/CosFace margin m")
    subcenters: int = option(1, group="classifier head", minimum="positive",
                             help="ArcFace/CosFace weight vectors per class; a class scores its closest "
                                  "(sub-center ArcFace: K = 3)")
    freeze_until: str = option("none", group="multi-branch training", choices=freeze_stages,
                               help="freeze the backbone up to and including this stage (ResNets)")


@dataclass
class ModelSpec(ModelOptions):
    """Everything needed to rebuild the network from a checkpoint alone: the options plus what the data decides."""

    in_channels: int = option(3, cli=False)
    n_classes: int = option(0, cli=False)  # 0 = no classifier head

    @classmethod
    def of(cls, options: ModelOptions, in_channels: int, n_classes: int) -> "ModelSpec":
        shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(ModelOptions)}
        return cls(**shared, in_channels=in_channels, n_classes=n_classes)

    def to_dict(self) -> dict:
        return asdict(self)


class SiameseNet(nn.Module):
    def __init__(self, spec: ModelSpec, pretrained: str = "none", pretrained_run: dict | None | object = NOT_READ):
        """``pretrained_run``: the checkpoint of a siamkit run ``pretrained`` names, when the caller read it already."""
        super().__init__()
        self.spec = spec
        self.backbone, width = build_backbone(spec.backbone, pretrained, spec.in_channels, pretrained_run=pretrained_run)
        self.embedding = EmbeddingHead(width, spec.embedding_dim, spec.embedding_activation)
        self.classifier = (
            build_classifier(spec.classifier, width if spec.classifier_input == "features" else spec.embedding_dim,
                             spec.n_classes, spec.scale, spec.class_margin, spec.subcenters)
            if spec.n_classes > 0
            else None
        )
        # Names (not modules) of the BatchNorm layers that stay in eval mode whatever model.train() says:
        # a layer swapped for another (sync BN) keeps its name, so this stays true without being told.
        frozen_prefixes: list[str] = []
        if spec.freeze_until != "none":
            names = {id(m): n for n, m in self.backbone.named_modules()}
            for module in stage_modules(spec.backbone, self.backbone, spec.freeze_until):
                module.requires_grad_(False)
                frozen_prefixes.append(names[id(module)])
        if get_policy(spec.bn_policy).eval_bn:
            frozen_prefixes = [""]
        self.eval_bn_names = tuple(
            f"backbone.{n}" for n, m in self.backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(_within(n, p) for p in frozen_prefixes)
        )
        self.train()

    @property
    def bn(self) -> list[nn.Module]:
        """The backbone's BatchNorm layers, as they are now (after a sync-BN conversion too)."""
        return bn_layers(self.backbone)

    def train(self, mode: bool = True) -> "SiameseNet":
        super().train(mode)
        for name in self.eval_bn_names:
            self.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (backbone features, embeddings)."""
        features = self.backbone(x)
        return features, self.embedding(features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.backbone(x))

    def classify(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head")
        return self.classifier(features, labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def network_of(ckpt: dict, where: str) -> SiameseNet:
    """The network a checkpoint (or a built-in model's checkpoint, models/zoo.py) describes, in eval mode."""
    try:
        model = SiameseNet(ModelSpec(**ckpt["model_spec"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise SiamkitError(f"{where} does not match this version of siamkit's models ({type(e).__name__}: "
                           f"{str(e)[:120]})") from None
    return model.eval()


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")
