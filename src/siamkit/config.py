"""TrainConfig: every training option declared once, with its default, help and choices.

The command line (``siamkit train --help``) is generated from these fields, and ``validate`` checks
the values against their choices (read from the registries of losses, BN policies, backbones, classifier heads and
optimizers when used) and against each other, so an option cannot exist in one place only. The model's options
are ``ModelOptions`` (models/siamese.py), part of this class. ``TrainConfig.for_data`` resolves the recipe: the
configuration a plain ``siamkit train --data DATA`` runs, from Python and from the command line alike.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accel import CPU_TUNINGS
from .batchnorm import POLICIES, get_policy
from .data.limits import check_side
from .data.sources import FILE_SOURCES, SOURCES, source_of
from .data.transforms import AUGMENTATIONS, FaceAugment
from .errors import SiamkitError
from .losses import loss_names, metric_loss_class, mining_names, minings_of
from .models.backbones import DLIB_BACKBONE
from .models.heads import CLASSIFIERS
from .models.partial_fc import margin_head
from .models.siamese import ModelOptions
from .models.zoo import builtin_model
from .optimizers import OPTIMIZERS
from .options import check_fields, option

AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
DATA_IN_MEMORY = ("auto", "yes", "no")
# Recipes: sets of options that work well together, measured by experiments/recipe.py (docs/results.md, "Accuracy on
# unseen faces"). `siamkit train --recipe auto` (the default) applies the data source's recipe; options given
# on the command line override it. From Python: TrainConfig.for_data(data, **options), the same resolution.
RECIPES: dict[str, dict[str, Any]] = {
    "none": {},
    "faces": {
        "backbone": "resnet18-small-w16-flat", "image_size": [32, 32], "augment": "face", "eval_flip": True,
        # CosFace alone on P x K batches (the batch-hard triplet term measured worse on held-out people)
        "identities_per_batch": 16, "images_per_identity": 4, "mining": "batch-hard", "metric_weight": 0.0,
        "classifier": "cosface", "classifier_input": "embedding", "scale": 30.0, "class_margin": 0.35,
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "epochs": 100, "max_steps": 3000, "warmup_steps": 15,
        # evaluate and ship the weights' moving average (experiments/results/recipe.md section 10: +0.2 points on
        # AT&T validation and on ROF-neutral, within the seeds' spread; at AT&T's 500 steps the warm-up sets the decay)
        "ema_decay": 0.99,
        # average the embeddings of the image and four 2-pixel shifts, each with its mirror (recipe.md section 13:
        # +1.1 points on ROF-neutral's held-out people, AT&T validation within its noise)
        "eval_shifts": True,
    },
    # Fine-tuning dlib's face ResNet (`siamkit train --pretrained dlib --data FOLDER`, docs/face-model.md), chosen on
    # validation folds (experiments/results/dlib_finetune.md): a gentle update that keeps what ~3M faces taught it.
    # Candidates that trained more (CosFace with a fresh classifier, lr 1e-4, layer3 and up, weight decay towards 0)
    # fell 2-13 points below the model as it is on AT&T and ROF-neutral validation people.
    "dlib-finetune": {
        "pretrained": "dlib", "backbone": "dlib-resnet29", "image_size": [150, 150], "augment": "flip",
        # dlib's 128-d layer stays the embedding head, unnormalised (dlib's Euclidean distance: an l2 embedding read
        # 0.5-0.7 points lower on ROF-neutral before any step); only layer5 and that layer train
        "pretrained_head": "keep", "embedding_dim": 128, "embedding_activation": "none", "freeze_until": "layer4",
        # the triplet loss on P x K batches, hardest positive and negative of each anchor; no classifier
        "identities_per_batch": 8, "images_per_identity": 4, "loss": "triplet", "mining": "batch-hard",
        "metric_weight": 1.0, "classification_weight": 0.0,
        # no weight decay: it would pull the pretrained weights towards zero
        "optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.0, "steps": 100, "warmup_steps": 15,
    },
}
# The recipe `--recipe auto` picks for --pretrained dlib, whatever the data.
PRETRAINED_RECIPES = {"dlib": "dlib-finetune"}


def recipe_for(recipe: str, data: str, pretrained: str) -> dict[str, Any]:
    """The options a run starts from (the one place recipes are resolved): --recipe NAME's, or with --recipe auto
    the pretrained model's (dlib-finetune for --pretrained dlib), else the data source's (faces, or none for digits)."""
    if recipe == "auto":
        recipe = PRETRAINED_RECIPES.get(pretrained) or source_of(data).recipe
    return RECIPES[recipe]

# Keys a run's config.json holds besides the options (written by the loop; ignored by --config).
RUN_KEYS = ("siamkit_version", "world_size", "out")
# Argument groups of `siamkit train --help`, in this order.
GROUPS = ("data", "model", "loss and sampling", "classifier head", "multi-branch training", "optimisation", "speed",
          "run", "distributed (under torchrun)")


def sources_help() -> str:
    return (f"folder with one sub-folder per identity, a file ({' | '.join('*' + s for s in FILE_SOURCES)}: "
            f"docs/guide/field-data.md), or {' | '.join(SOURCES)}")


@dataclass
class TrainConfig(ModelOptions):
    # data
    data: str = option("att", group="data", help=sources_help)
    val_identities: float = option(0.2, group="data", minimum="non-negative",
                                   help="identities held out for validation: a fraction < 1 or a count")
    image_size: list[int] | None = option(None, group="data", nargs=2, metavar=("H", "W"),
                                          help="input size; auto = the source's: 32x32 for digits, 64x64 otherwise")
    center_crop: float | None = option(None, group="data",
                                       help="keep this fraction of the shorter side; auto = the source's (lfw: 0.5, "
                                            "else 1)")
    grayscale: bool = option(False, group="data", help="train on one channel")
    photo_box: str = option("auto", group="data", choices=("auto", "off"),
                            help="auto: on a folder written by `siamkit align` from tight crops (its report's photo box "
                                 "smaller than the crop), fill every image beyond that box from the box's edge, in "
                                 "training and at every use of the model, so that faces cut from wider photos look like "
                                 "the training crops (docs/guide/alignment.md); off: images as they are")
    augment: str = option("auto", group="data", choices=lambda: ("auto", *AUGMENTATIONS),
                          help="auto = the source's default: none for digits, face for the built-in faces, flip-shift "
                               "(mirror + small shifts) otherwise; face = per-image scale, rotation, shift, mirror, "
                               "brightness/contrast and erasing (data/transforms.py FaceAugment)")
    face_augment: str = option("", group="data", metavar="FIELD=VALUE,...",
                               help="with --augment face: change FaceAugment's settings (data/transforms.py), e.g. "
                                    "erase=0,rotation=15,scale=0.8:1.25; fields: scale (LO:HI), rotation (degrees), "
                                    "shift (fraction of the side), flip and erase (probabilities), "
                                    "brightness_contrast, erase_area (LO:HI fraction of the image)")
    cache_dir: str | None = option(None, group="data",
                                   help="folder of decoded caches: a data folder is decoded once into a file there and "
                                        "memory-mapped by later runs (auto: $SIAMKIT_CACHE_DIR, else "
                                        "$XDG_CACHE_HOME/siamkit, else ~/.cache/siamkit), also holding --cpu-tuning auto's "
                                        "measured kernels (cpu-tuning.json); none = decode into memory every run, "
                                        "no decoded cache (the measured kernels then stay in the default folder)")
    cache_max_gb: float = option(50.0, group="data", minimum="positive",
                                 help="size cap of the cache folder: the least recently used caches are removed first")
    data_in_memory: str = option("auto", group="data", choices=DATA_IN_MEMORY,
                                 help="yes: all training images on the training device; no: each step's images read "
                                      "from the decoded cache in the background; auto: yes when they take under half "
                                      "of the device's free memory")
    # model (the rest are ModelOptions)
    pretrained: str = option("none", group="model",
                             help="none | imagenet | dlib (dlib's face ResNet: implies --backbone dlib-resnet29, "
                                  "dlib's 150 px face chips cut from the photos, and the dlib-finetune recipe; "
                                  "docs/face-model.md) | PATH to a torchvision state dict | a siamkit run folder or "
                                  "checkpoint (its backbone; the heads start fresh)")
    pretrained_head: str = option("fresh", group="model", choices=("fresh", "keep"),
                                  help="with --pretrained dlib: keep = the embedding head starts as dlib's 128-d layer "
                                       "(--embedding-dim 128); fresh = a new one")
    # loss and sampling
    loss: str = option("triplet", group="loss and sampling", choices=loss_names,
                       help="metric loss on the embeddings (losses.py's registry)")
    margin: float | None = option(None, group="loss and sampling",
                                  help="the metric loss's margin; auto = the loss's own (contrastive 1.0, triplet 0.2)")
    batch_size: int = option(32, group="loss and sampling", minimum="positive", help="tuples per step, per process")
    identities_per_batch: int = option(0, group="loss and sampling", metavar="P",
                                       help="PK batches: P identities... (0 = explicit tuples)")
    images_per_identity: int = option(0, group="loss and sampling", metavar="K", help="...with K images each")
    mining: str = option("none", group="loss and sampling", choices=mining_names, help="online mining on PK batches")
    classification_weight: float = option(1.0, group="classifier head", minimum="non-negative",
                                          help="weight W of the classification loss on every branch (0 = no classifier)")
    classifier_sample_rate: float = option(1.0, group="classifier head", minimum="positive",
                                           help="partial FC below 1: with --classifier arcface or cosface, each "
                                                "process holds 1/N of the class centres and each step samples this "
                                                "share of them, every class of the batch included, for millions of "
                                                "identities (docs/guide/partial-fc.md); 1 = the full classifier on "
                                                "every process")
    metric_weight: float = option(1.0, group="loss and sampling", minimum="non-negative",
                                  help="weight of the metric loss (0 = the classifier alone, e.g. CosFace training)")
    # optimisation
    optimizer: str = option("adam", group="optimisation", choices=lambda: tuple(OPTIMIZERS),
                            help="adamw: decoupled weight decay (--weight-decay) on the weights, not on biases and norms")
    lr: float = option(1e-3, group="optimisation", help="peak learning rate")
    betas: list[float] = option(group="optimisation", nargs=2, default_factory=lambda: [0.9, 0.999],
                                help="Adam's moment decays")
    weight_decay: float = option(0.0, group="optimisation", minimum="non-negative", help="weight decay")
    steps: int = option(0, group="optimisation", minimum="non-negative",
                        help="total steps of the run (0 = from --epochs, else 200)")
    epochs: int = option(0, group="optimisation", minimum="non-negative", help="total epochs of the run")
    max_steps: int = option(0, group="optimisation", minimum="non-negative",
                            help="at most this many steps, whatever --epochs gives (0 = no cap): keeps a budget in "
                                 "epochs within a time budget on large data sets")
    warmup_steps: int = option(0, group="optimisation", minimum="non-negative",
                               help="steps of linear learning-rate warm-up")
    schedule: str = option("cosine", group="optimisation", choices=SCHEDULES,
                           help="cosine decay to 0 over the run, or constant")
    ema_decay: float = option(0.0, group="optimisation", minimum="non-negative",
                              help="evaluate and save an exponential moving average of the weights, updated after "
                                   "every step with this decay (warmed up as min(D, (1+t)/(10+t)) at update t; "
                                   "0 = off): validation, the held-out report, the threshold and the saved model "
                                   "use the average (train/ema.py)")
    # speed
    compile: bool = option(False, group="speed", help="torch.compile the training step")
    compile_mode: str = option("default", group="speed", choices=("default", "reduce-overhead", "max-autotune"),
                               help="torch.compile's mode, with --compile: reduce-overhead replays the step as a "
                                    "CUDA graph (on CUDA; fewer kernel launches at small batches)")
    amp: str = option("off", group="speed", choices=AMP_MODES, help="mixed precision")
    channels_last: bool = option(True, group="speed", flag="--no-channels-last", help="keep the NCHW layout")
    cpu_tuning: str = option("auto", group="speed", choices=CPU_TUNINGS,
                             help="auto: siamkit's CPU speed-ups when training on CPU (src/siamkit/accel.py): each "
                                  "convolution's kernel (PyTorch's, a swapped weight gradient, Winograd) measured at the "
                                  "start and the fastest kept "
                                  "(cached per machine in the --cache-dir folder, stored in checkpoints and reused by "
                                  "--resume), and malloc keeping freed memory; off: PyTorch's own kernels and malloc, "
                                  "for runs that must match across machines")
    # run
    out: str | None = option(None, group="run", help="run folder", none_means="runs/<date-time>")
    device: str = option("auto", group="run", help="auto | cpu | cuda")
    seed: int = option(0, group="run", help="seed of everything random in the run")
    log_every: int = option(10, group="run", minimum="positive", help="steps between rows of metrics.csv")
    checkpoint_every: int = option(200, group="run", minimum="positive", help="steps between checkpoints")
    keep_checkpoints: int = option(1, group="run", minimum="positive", help="1 = last.pt only; N > 1 also keeps the newest N step-N.pt files")
    eval_every: int = option(0, group="run", minimum="non-negative",
                             help="evaluate held-out identities (and --eval-data) every N steps and keep best.pt")
    eval_data: list[str] | None = option(None, group="run", nargs="+", metavar="FILE.bin", none_means="none",
                                         help="validation sets of pairs (insightface's .bin files: lfw.bin, "
                                              "cfp_fp.bin, agedb_30.bin) evaluated every --eval-every steps (best.pt "
                                              "by their mean accuracy when no identities are held out) and at the "
                                              "end, each report in RUN/eval/NAME/ (docs/guide/field-data.md)")
    max_bad_steps: int = option(5, group="run", minimum="positive",
                                help="stop after this many non-finite steps in a row")
    eval_flip: bool = option(False, group="run", help="add mirrored images' embeddings at evaluation")
    eval_shifts: bool = option(False, group="run",
                               help="also add the embeddings of four copies of each image shifted by 1/16 of its "
                                    "side (left, right, up, down; edges repeated; each with its mirror under "
                                    "--eval-flip) at evaluation and at every later use of the model: 5x the "
                                    "embedding cost (experiments/results/recipe.md section 13)")
    baseline_dlib: bool = option(True, group="run", flag="--no-baseline-dlib",
                                 help="leave out the held-out report's second baseline, the off-the-shelf dlib face "
                                      "model on the same pairs (needs the align extra; docs/face-model.md)")
    tensorboard: bool = option(False, group="run", help="also log to RUN/tensorboard: the metrics.csv values, "
                               "held-out metrics, the ROC, held-out embeddings (pip install \"siamkit[tensorboard]\")")
    # distributed
    sync_bn: bool = option(False, group="distributed (under torchrun)",
                           help="BatchNorm statistics over the global batch of all processes (SyncBatchNorm)")
    gather_embeddings: bool = option(False, group="distributed (under torchrun)",
                                     help="PK batches: mining and the metric loss see every process's embeddings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_data(cls, data: str = "att", recipe: str = "auto", **options: Any) -> "TrainConfig":
        """The configuration ``siamkit train --data DATA [--recipe R] [--option value ...]`` runs: the recipe's
        options (auto: the pretrained model's, else the data's; config.recipe_for), then ``options`` over them."""
        start = recipe_for(recipe, data, options.get("pretrained", "none"))
        return cls(**{**start, "data": data, **options})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read_options(cls, path: str | Path) -> dict[str, Any]:
        """The options of a run's config.json (for ``--config``); unknown keys are refused with one line."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SiamkitError(f"--config {path}: cannot read it as JSON ({e}); pass a run's config.json") from None
        if not isinstance(values, dict):
            raise SiamkitError(f"--config {path}: expected a JSON object of options, like a run's config.json")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names and k not in RUN_KEYS)
        if unknown:
            raise SiamkitError(f"--config {path}: unknown option(s) {', '.join(unknown)}; remove them or fix their names")
        return {k: v for k, v in values.items() if k in names and k != "out"}

    @property
    def pk_batches(self) -> bool:
        return self.identities_per_batch > 0

    @property
    def n_branches(self) -> int:
        """Branches of one tuple: 2 for pairs, 3 for triplets, 1 for a PK batch (the loss mines its tuples)."""
        return metric_loss_class(self.loss, self.mining).n_branches

    def validate(self) -> None:
        """Raise SiamkitError naming the first bad option and what it accepts."""
        check_fields(self)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SiamkitError(f"--device {self.device!r} is not known; choose auto, cpu or cuda")
        if self.margin is not None and self.margin <= 0:
            raise SiamkitError(f"--margin must be positive, got {self.margin}")
        if not self.lr > 0:
            raise SiamkitError(f"--lr must be positive, got {self.lr}")
        if not self.ema_decay < 1:
            raise SiamkitError(f"--ema-decay takes a decay in [0, 1) (0 = off), got {self.ema_decay}; e.g. 0.99")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SiamkitError(f"--betas takes two numbers in [0, 1), got {self.betas}")
        if self.val_identities >= 1 and self.val_identities != int(self.val_identities):
            raise SiamkitError("--val-identities takes a fraction below 1 or a whole count of identities")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 8):
            raise SiamkitError(f"--image-size takes H W, each at least 8 pixels, got {self.image_size}")
        for side in self.image_size or ():
            check_side(side, "--image-size")
        if self.face_augment:
            FaceAugment.from_overrides(self.face_augment)  # its one-line error, before anything is decoded
        if self.center_crop is not None and not 0 < self.center_crop <= 1:
            raise SiamkitError(f"--center-crop takes a fraction in (0, 1], got {self.center_crop}")
        if self.metric_weight == 0 and self.classification_weight == 0:
            raise SiamkitError("--metric-weight 0 and --classification-weight 0 leave nothing to train; raise one of them")
        if self.scale <= 0 or self.class_margin < 0:
            raise SiamkitError("--scale must be positive and --class-margin 0 or more")
        if self.subcenters > 1 and not CLASSIFIERS.lookup(self.classifier).supports_subcenters:
            takes = " or ".join(name for name, head in CLASSIFIERS.items() if head.supports_subcenters)
            raise SiamkitError(f"--subcenters {self.subcenters} applies to --classifier {takes}, "
                               f"not {self.classifier}; choose one of those or leave --subcenters at 1")
        self._validate_batches()
        self._validate_pretrained()
        self._validate_eval_data()
        self._validate_partial_fc()
        if self.compile_mode != "default" and not self.compile:
            raise SiamkitError(f"--compile-mode {self.compile_mode} applies to a compiled step: add --compile")
        if self.amp == "fp16" and self.device == "cpu":
            raise SiamkitError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")

    def _validate_eval_data(self) -> None:
        """--data a training set, --eval-data .bin validation sets of distinct names (their report folders)."""
        if source_of(self.data).validation_only:
            raise SiamkitError(f"--data {self.data} is a validation set of pairs, nothing to train on; train on a "
                               f"folder or a .rec and pass it with --eval-data {self.data}")
        names = [Path(path).stem for path in self.eval_data or ()]
        for path in self.eval_data or ():
            if not source_of(path).validation_only:
                raise SiamkitError(f"--eval-data takes validation sets of pairs (.bin files), got {path}; pass a "
                                   f".bin, or hold out identities of the training data with --val-identities")
        if len(set(names)) != len(names):
            raise SiamkitError(f"--eval-data names two files {', '.join(n for n in names if names.count(n) > 1)}: "
                               f"their reports would share a folder (RUN/eval/NAME/); rename one")

    @property
    def partial_fc(self) -> bool:
        """The classifier's centres sharded over the processes and sampled (models/partial_fc.py)."""
        return self.classifier_sample_rate < 1 and self.classification_weight > 0

    def _validate_partial_fc(self) -> None:
        if self.classifier_sample_rate > 1:
            raise SiamkitError(f"--classifier-sample-rate takes a share in (0, 1], got {self.classifier_sample_rate}")
        if not self.partial_fc:
            return
        margin_head(self.classifier)
        if self.subcenters > 1:
            raise SiamkitError("--classifier-sample-rate below 1 (partial FC) has one centre per class: leave "
                               "--subcenters at 1, or the sample rate at 1")
        if self.compile:
            raise SiamkitError("--classifier-sample-rate below 1 (partial FC) draws its centres outside the compiled "
                               "graph: drop --compile, or leave the sample rate at 1")

    def _validate_pretrained(self) -> None:
        """--pretrained dlib: dlib's backbone, its 150x150 RGB chips; --pretrained-head keep: dlib's 128-d layer."""
        if self.pretrained == "dlib":
            builtin_model("dlib")  # says so when a folder ./dlib is there (the built-in wins; ./dlib reaches it)
            if self.backbone != DLIB_BACKBONE:
                raise SiamkitError(f"--pretrained dlib is dlib's face ResNet, --backbone {DLIB_BACKBONE}; drop "
                                   f"--backbone {self.backbone} (the backbone is implied)")
            chip = self.image_size in (None, [150, 150], (150, 150)) and self.center_crop in (None, 1.0)
            if not chip or self.grayscale:
                raise SiamkitError("--pretrained dlib reads dlib's 150x150 RGB face chips; drop --image-size, "
                                   "--grayscale and --center-crop")
        if self.pretrained_head == "keep" and (self.pretrained != "dlib" or self.embedding_dim != 128):
            raise SiamkitError("--pretrained-head keep starts the embedding head as dlib's 128-d layer: it needs "
                               "--pretrained dlib and --embedding-dim 128")

    def _validate_batches(self) -> None:
        """Explicit tuples, or PK batches with a loss that mines; the BN policy must fit."""
        pk = (self.identities_per_batch, self.images_per_identity)
        if (pk[0] > 0) != (pk[1] > 0) or min(pk) < 0:
            raise SiamkitError("PK batches need both --identities-per-batch P and --images-per-identity K (P >= 2, K >= 2)")
        if not self.pk_batches:
            if self.mining != "none":
                raise SiamkitError("--mining needs PK batches: add --identities-per-batch P --images-per-identity K")
            metric_loss_class(self.loss, "none")
            return
        if self.identities_per_batch < 2 or self.images_per_identity < 2:
            raise SiamkitError("PK batches need P >= 2 identities and K >= 2 images per identity")
        offered = {loss: minings_of(loss) for loss in loss_names() if minings_of(loss)}
        if self.mining == "none":
            what = " or ".join(f"{'|'.join(m)} ({loss})" for loss, m in sorted(offered.items(), key=lambda kv: -len(kv[1])))
            raise SiamkitError(f"PK batches need --mining {what}")
        if self.mining not in offered.get(self.loss, ()):
            raise SiamkitError(
                f"--loss {self.loss} on PK batches takes --mining {' | '.join(offered.get(self.loss, ())) or '(none)'}"
            )
        if not get_policy(self.bn_policy).single_pass:
            raise SiamkitError(
                f"--bn-policy {self.bn_policy} needs branches, but a PK batch is a single branch; "
                f"use {' or '.join(n for n, p in POLICIES.items() if p.single_pass)}, or drop --identities-per-batch"
            )
