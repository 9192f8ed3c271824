"""TrainConfig: the one place every training hyperparameter lives, with its default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SiamkitError

BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
LOSSES = ("contrastive", "triplet")
MINING = ("none", "batch-hard", "semi-hard", "all")
BN_POLICIES = ("joint", "sequential", "mean", "anchor", "frozen")
CLASSIFIERS = ("softmax", "arcface", "cosface")
ACTIVATIONS = ("l2", "sigmoid", "none")
FREEZE_STAGES = ("none", "conv1", "layer1", "layer2", "layer3", "layer4", "avgpool")
AMP_MODES = ("off", "bf16", "fp16")
CPU_ALLOCATORS = ("cached", "system")
AUGMENTS = ("auto", "none", "flip", "flip-shift")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    # data
    data: str = "digits"
    val_identities: float = 0.2  # fraction (< 1) or count (>= 1) of identities held out
    image_size: list[int] | None = None  # [H, W]; None = the source's default
    center_crop: float | None = None  # fraction of the shorter side; None = the source's default
    grayscale: bool = False
    augment: str = "auto"
    # model
    backbone: str = "resnet18"
    pretrained: str = "none"  # none | imagenet | PATH to a torchvision state dict
    embedding_dim: int = 128
    embedding_activation: str = "l2"
    # loss and sampling
    loss: str = "triplet"
    margin: float | None = None  # None = the loss's default (contrastive 1.0, triplet 0.2)
    batch_size: int = 32  # tuples (pairs or triplets) per step and per process
    mining: str = "none"
    identities_per_batch: int = 0  # P of a PK batch; 0 = explicit tuples
    images_per_identity: int = 0  # K of a PK batch
    # multi-branch training
    bn_policy: str = "joint"
    classification_weight: float = 1.0  # classifier on every branch (0 = metric loss only)
    classifier: str = "softmax"
    scale: float = 30.0
    class_margin: float = 0.3
    freeze_until: str = "none"
    # optimisation
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    steps: int = 0  # total steps of the run; 0 = use epochs
    epochs: int = 0  # total epochs of the run; 0 = the source's default step budget
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine decay to 0 over the run, or constant
    # speed
    compile: bool = False
    amp: str = "off"
    channels_last: bool = True
    native_conv_backward: bool = False  # True: no SmallMapConv2d (models/conv_backward.py)
    cpu_allocator: str = "cached"  # cached: keep freed memory for reuse on CPU (train/cpu_memory.py)
    # run
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    eval_every: int = 0
    max_bad_steps: int = 5
    eval_flip: bool = False
    # distributed
    sync_bn: bool = False
    gather_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def pk_batches(self) -> bool:
        return self.identities_per_batch > 0

    @property
    def n_branches(self) -> int:
        """Branches of one explicit tuple (1 for a PK batch, which is a single branch)."""
        if self.pk_batches:
            return 1
        return 2 if self.loss == "contrastive" else 3

    @property
    def resolved_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return 1.0 if self.loss == "contrastive" else 0.2

    def validate(self) -> None:
        """Raise SiamkitError naming the first bad option and what it accepts."""

        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise SiamkitError(f"--{name.replace('_', '-')} {value!r} is not known; choose one of: {', '.join(allowed)}")

        choice("backbone", self.backbone, BACKBONES)
        choice("loss", self.loss, LOSSES)
        choice("mining", self.mining, MINING)
        choice("bn_policy", self.bn_policy, BN_POLICIES)
        choice("classifier", self.classifier, CLASSIFIERS)
        choice("embedding_activation", self.embedding_activation, ACTIVATIONS)
        choice("freeze_until", self.freeze_until, FREEZE_STAGES)
        choice("amp", self.amp, AMP_MODES)
        choice("cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        choice("augment", self.augment, AUGMENTS)
        choice("schedule", self.schedule, SCHEDULES)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SiamkitError(f"--device {self.device!r} is not known; choose auto, cpu or cuda")
        positive = {
            "batch_size": self.batch_size,
            "embedding_dim": self.embedding_dim,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "max_bad_steps": self.max_bad_steps,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SiamkitError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        for name in ("steps", "epochs", "eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SiamkitError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.margin is not None and self.margin <= 0:
            raise SiamkitError(f"--margin must be positive, got {self.margin}")
        if not self.lr > 0:
            raise SiamkitError(f"--lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SiamkitError(f"--betas takes two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise SiamkitError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.val_identities < 0:
            raise SiamkitError(f"--val-identities must be 0 or more, got {self.val_identities}")
        if self.val_identities >= 1 and self.val_identities != int(self.val_identities):
            raise SiamkitError("--val-identities takes a fraction below 1 or a whole count of identities")
        if self.image_size is not None:
            if len(self.image_size) != 2 or min(self.image_size) < 8:
                raise SiamkitError(f"--image-size takes H W, each at least 8 pixels, got {self.image_size}")
        if self.center_crop is not None and not 0 < self.center_crop <= 1:
            raise SiamkitError(f"--center-crop takes a fraction in (0, 1], got {self.center_crop}")
        if self.classification_weight < 0:
            raise SiamkitError(f"--classification-weight must be 0 or more, got {self.classification_weight}")
        if self.scale <= 0 or self.class_margin < 0:
            raise SiamkitError("--scale must be positive and --class-margin 0 or more")
        pk = (self.identities_per_batch, self.images_per_identity)
        if (pk[0] > 0) != (pk[1] > 0) or min(pk) < 0:
            raise SiamkitError("PK batches need both --identities-per-batch P and --images-per-identity K (P >= 2, K >= 2)")
        if self.pk_batches:
            if self.identities_per_batch < 2 or self.images_per_identity < 2:
                raise SiamkitError("PK batches need P >= 2 identities and K >= 2 images per identity")
            if self.mining == "none":
                raise SiamkitError("PK batches need --mining batch-hard|semi-hard|all (triplet) or all (contrastive)")
            if self.loss == "contrastive" and self.mining != "all":
                raise SiamkitError("--loss contrastive on PK batches uses every pair: pass --mining all")
            if self.bn_policy not in ("joint", "frozen"):
                raise SiamkitError(
                    f"--bn-policy {self.bn_policy} needs branches, but a PK batch is a single branch; "
                    "use joint or frozen, or drop --identities-per-batch"
                )
        elif self.mining != "none":
            raise SiamkitError("--mining needs PK batches: add --identities-per-batch P --images-per-identity K")
        if self.amp == "fp16" and self.device == "cpu":
            raise SiamkitError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")
