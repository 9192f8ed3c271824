"""SiameseNet: one shared backbone, an embedding head and an optional identity classifier."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..batchnorm import bn_layers, forward_branches
from .backbones import build_backbone, stage_modules
from .heads import EmbeddingHead, build_classifier


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network from a checkpoint alone."""

    backbone: str = "resnet18"
    in_channels: int = 3
    embedding_dim: int = 128
    embedding_activation: str = "l2"
    n_classes: int = 0  # 0 = no classifier head
    classifier: str = "softmax"
    scale: float = 30.0
    class_margin: float = 0.3
    bn_policy: str = "joint"
    freeze_until: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


class SiameseNet(nn.Module):
    def __init__(self, spec: ModelSpec, pretrained: str = "none"):
        super().__init__()
        self.spec = spec
        self.backbone, width = build_backbone(spec.backbone, pretrained, spec.in_channels)
        self.embedding = EmbeddingHead(width, spec.embedding_dim, spec.embedding_activation)
        self.classifier = (
            build_classifier(spec.classifier, width, spec.n_classes, spec.scale, spec.class_margin)
            if spec.n_classes > 0
            else None
        )
        self.bn = bn_layers(self.backbone)
        # BatchNorm layers that stay in eval mode whatever model.train() says.
        self._eval_bn: list[nn.Module] = []
        if spec.freeze_until != "none":
            frozen = stage_modules(spec.backbone, self.backbone, spec.freeze_until)
            for module in frozen:
                module.requires_grad_(False)
                self._eval_bn += bn_layers(module)
        if spec.bn_policy == "frozen":
            self._eval_bn = list(self.bn)
        self.train()

    def train(self, mode: bool = True) -> "SiameseNet":
        super().train(mode)
        for m in self._eval_bn:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (backbone features, embeddings)."""
        features = self.backbone(x)
        return features, self.embedding(features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.backbone(x))

    def forward_branches(self, x: torch.Tensor, n_branches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and embeddings of the branches of x (concatenated branch-major) under the BN policy."""
        return forward_branches(self, x, n_branches, self.spec.bn_policy, self.bn)

    def classify(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head")
        return self.classifier(features, labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
