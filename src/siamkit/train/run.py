"""Build a training run once: device, run folder, data, sampler, model and what updates it.

``build_training`` is the model side alone (model, loss, optimizer, schedule, the fused step): the
benchmarks call it to measure exactly what ``siamkit train`` runs. ``build_run`` adds the data, the
run folder and, with ``--resume``, the state of the last checkpoint.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import accel, kernel_choice
from .._version import __version__
from ..batchnorm import get_policy
from ..checkpoint import load_checkpoint, remove_stale_temp_files, set_rng_state
from ..config import TrainConfig
from ..data.cache import ImageRows, load_data
from ..data.prefetch import BatchPrefetcher
from ..data.samplers import PKSampler, TupleSampler
from ..data.sources import IdentityDataset, default_preprocess, require_trainable, source_of, split_identities
from ..data.transforms import (AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, Augmentation, Preprocess, no_augmentation,
                               normalize)
from ..device import resolve_device, use_fast_cuda_kernels
from ..errors import SiamkitError, info, warn
from ..faces.chip_data import chip_folder
from ..faces.chips import is_dlib_chip
from ..faces.folder import read_alignment
from ..fileio import atomic_write_json, write_error
from ..losses import JointLoss, build_metric_loss
from ..models.backbones import NOT_READ, siamkit_checkpoint
from ..models.partial_fc import PartialFC
from ..models.siamese import ModelSpec, SiameseNet
from ..models.zoo import BUILTIN_MODELS, dlib_preprocess
from ..outputs import RUN_MARKER, check_not_input, check_replace_run, existing_inputs, write_run_marker
from . import distributed
from .ema import WeightEMA
from .eval_sets import EvalSet, load_eval_sets
from .head_shards import HEAD_KEY, take_shard
from .small_data import fit_to_data
from .step import Training, TrainStep, build_optimizer
from .sync_bn import convert_to_sync_bn

# Step budget when neither --steps nor --epochs is given.
DEFAULT_STEPS = 200
# --data-in-memory auto keeps the training images on the device while they take at most this share of its free memory.
MAX_IN_MEMORY_SHARE = 0.5


@dataclass
class Run:
    """One training run: its settings, data, sampler, model and where it writes."""

    cfg: TrainConfig
    ctx: distributed.DistContext
    device: torch.device
    run_dir: Path
    pre: Preprocess
    train_ds: IdentityDataset
    val_ds: IdentityDataset | None
    sampler: PKSampler | TupleSampler
    total: int  # the run's total steps
    training: Training
    images: torch.Tensor | None  # the training images (uint8) on the device, or None when streamed
    labels: torch.Tensor
    stream: BatchPrefetcher | None = None  # reads each step's images from the decoded cache (--data-in-memory no)
    start_step: int = 0
    best_accuracy: float = -1.0
    resumed: bool = False  # continued from checkpoints/last.pt
    log_window: dict[str, Any] | None = None  # the resumed checkpoint's loss sums since its last metrics row
    alignment: dict | None = None  # the training folder's alignment (siamkit align's report), kept in checkpoints
    # --augment's function (data/transforms.py AUGMENTATIONS), with --face-augment's settings for face
    augmentation: Augmentation = no_augmentation((), "")
    eval_sets: list[EvalSet] = field(default_factory=list)  # --eval-data's validation sets of pairs

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels of ``step``: a pure function of (seed, step, rank), so resume is exact."""
        idx = torch.from_numpy(self.sampler.batch(step).reshape(-1)).to(self.device)
        x = self.stream.get(step) if self.stream is not None else self.images[idx]
        x = self.augmentation(x, torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step))
        return normalize(x, self.pre, self.cfg.channels_last), self.labels[idx]


def score_for(activation: str) -> str:
    """Cosine for l2 embeddings (monotone in their distance); negative distance for the others."""
    return "cosine" if activation == "l2" else "euclidean"


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def augment_mode(cfg: TrainConfig) -> str:
    return source_of(cfg.data).augment if cfg.augment == "auto" else cfg.augment


def fill_box_for(cfg: TrainConfig, alignment: dict | None | object = NOT_READ) -> tuple[float, float, float, float] | None:
    """--photo-box auto: the aligned folder's photo box as fractions of its crop, None when the photos filled the
    whole crop or the data was not written by `siamkit align`. ``alignment``: --data's, when read already."""
    if cfg.photo_box != "auto":
        return None
    alignment = read_alignment(cfg.data) if alignment is NOT_READ else alignment
    box, size = (alignment or {}).get("photo_box"), (alignment or {}).get("size")
    if not box or list(box) == [0.0, 0.0, float(size), float(size)]:
        return None
    return tuple(round(float(v) / size, 4) for v in box)


def preprocess_for(cfg: TrainConfig, pretrained_run: dict | None | object = NOT_READ,
                   alignment: dict | None | object = NOT_READ) -> Preprocess:
    """The preprocessing of the run's images; ``pretrained_run`` (--pretrained's checkpoint) and ``alignment``
    (--data's alignment report), when the caller has read them already."""
    if cfg.pretrained == "dlib":
        return dlib_preprocess()  # dlib's own normalisation of its 150x150 RGB chips
    pre = replace(default_preprocess(cfg.data, cfg.image_size, cfg.center_crop, cfg.grayscale),
                  fill_box=fill_box_for(cfg, alignment))
    run = siamkit_checkpoint(cfg.pretrained) if pretrained_run is NOT_READ else pretrained_run
    if run is not None:
        # Fine-tuning a siamkit run: its normalisation, and its channels (the backbone's first layer has them).
        theirs = Preprocess.from_dict(run["preprocess"])
        return replace(pre, channels=theirs.channels, mean=theirs.mean, std=theirs.std)
    if cfg.pretrained != "none":
        # ImageNet weights expect ImageNet's statistics.
        c = pre.channels
        mean = IMAGENET_MEAN if c == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if c == 3 else (sum(IMAGENET_STD) / 3,)
        pre = replace(pre, channels=c, mean=mean, std=std)
    return pre


def build_model(cfg: TrainConfig, n_classes: int, in_channels: int,
                pretrained_run: dict | None | object = NOT_READ) -> SiameseNet:
    model = SiameseNet(ModelSpec.of(cfg, in_channels, n_classes), cfg.pretrained, pretrained_run)
    if cfg.pretrained_head == "keep":  # dlib's 128-d layer (no bias) as the embedding head's start
        dlib_head = BUILTIN_MODELS["dlib"].weights()
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(model.embedding.fc, name).copy_(dlib_head[f"embedding.fc.{name}"])
    return model


def reads_dlib_chips(cfg: TrainConfig, pretrained_run: dict | None) -> bool:
    """Whether the run trains on dlib's face chips: --pretrained dlib, or a run fine-tuned from it (its checkpoint)."""
    return cfg.pretrained == "dlib" or is_dlib_chip((pretrained_run or {}).get("alignment"))


def training_data(cfg: TrainConfig, progress: bool, pretrained_run: dict | None) -> str:
    """What --data is read from: itself, or for a run on dlib's face chips, the chips cut from it into the cache."""
    return chip_folder(cfg.data, cfg.cache_dir, progress) if reads_dlib_chips(cfg, pretrained_run) else cfg.data


def batch_rows(cfg: TrainConfig) -> int:
    """Images per step on one process: P x K for PK batches, branches x tuples otherwise."""
    return cfg.identities_per_batch * cfg.images_per_identity if cfg.pk_batches else cfg.n_branches * cfg.batch_size


def choose_conv_kernels(
    cfg: TrainConfig, model: SiameseNet, device: torch.device, in_channels: int, image_size: Sequence[int] | None,
    known: Mapping[str, str] | None, ctx: distributed.DistContext, progress: bool = False,
) -> tuple[dict[str, str], str]:
    """--cpu-tuning auto on CPU: each convolution shape's kernel, measured or reused, and applied.

    -> ({shape key: kernel}, the line for the run's log).

    The shapes are those of the training step's backbone passes: all branches at once for single-pass
    BatchNorm policies, one branch's rows for per-branch ones (whose passes all have that shape). They
    are found by one pass of a single image under hooks, in eval mode (no BatchNorm statistics change,
    no collective and no policy code runs), with the pass's batch size put in: nothing else about a
    convolution's input (channels, map size, memory format, dtype) depends on the batch size, and the
    pass costs a hundredth of a full batch's. The main process chooses and every process
    takes its choices, so all compute alike. ``known``: a resumed checkpoint's choices, reused as they are.
    Not under --compile or --amp, where the layers take PyTorch's kernels anyway (accel.TunedConv2d).
    """
    if device.type != "cpu" or cfg.cpu_tuning != "auto" or cfg.compile or cfg.amp != "off" or not image_size:
        return {}, ""

    def choose() -> tuple[dict[str, str], str]:
        rows = batch_rows(cfg)
        if not get_policy(model.spec.bn_policy).single_pass:
            rows //= cfg.n_branches
        dtype = next(model.parameters()).dtype  # the batch's (float32, or what a test made the model)
        x = torch.zeros(1, in_channels, *image_size, device=device, dtype=dtype)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        was_training = model.training

        def forward() -> None:
            with torch.no_grad():
                model.eval()(x)

        try:
            shapes = [replace(s, input=(rows, *s.input[1:])) for s in kernel_choice.conv_shapes(model, forward)]
        finally:
            model.train(was_training)
        choices = kernel_choice.choose(shapes, known=known, cache=kernel_choice.cache_file(cfg.cache_dir),
                                       progress=progress)
        return choices.to_dict(), choices.summary()

    kernels, note = distributed.from_main(ctx, choose)
    accel.use_kernels(model, {accel.ConvShape.from_key(k): v for k, v in kernels.items()})
    return kernels, note


def build_training(
    cfg: TrainConfig, n_classes: int, in_channels: int, device: torch.device, total: int,
    ctx: distributed.DistContext | None = None, *, image_size: Sequence[int] | None = None,
    conv_kernels: Mapping[str, str] | None = None, progress: bool = False,
    pretrained_run: dict | None | object = NOT_READ,
) -> Training:
    """Model, loss, optimizer, schedule and the fused step of ``cfg``, on ``device``.

    ``image_size`` (default: cfg.image_size) is the training images' size, at which --cpu-tuning auto
    measures the convolutions; ``conv_kernels``: the choices of a resumed checkpoint, reused instead;
    ``pretrained_run``: --pretrained's siamkit checkpoint, when the caller has read it already.
    """
    ctx = ctx or distributed.DistContext()
    accel.tune_process(device, cfg.cpu_tuning)
    use_fast_cuda_kernels(device)
    # Partial FC: the model has no classifier of its own; this process's shard of it is built beside the model.
    model = build_model(cfg, 0 if cfg.partial_fc else n_classes, in_channels, pretrained_run).to(device)
    head = sharded_head(cfg, model, n_classes, ctx).to(device) if cfg.partial_fc and n_classes else None
    sync_bn, gather = distributed.plan(cfg, ctx)
    if sync_bn:
        convert_to_sync_bn(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    kernels, tuning_note = choose_conv_kernels(cfg, model, device, in_channels, image_size or cfg.image_size, conv_kernels, ctx, progress)
    loss_fn = JointLoss(build_metric_loss(cfg.loss, cfg.mining, cfg.margin), cfg.classification_weight, cfg.metric_weight)
    params = model.trainable_parameters() + ([head.weight] if head is not None else [])
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule))
    # DDP runs the backbone passes; heads and loss run on the model itself (see TrainStep).
    runner = distributed.wrap_ddp(model, device) if ctx.enabled else None
    step_module = TrainStep(model, loss_fn, cfg.n_branches, runner, distributed.gather_with_grad if gather else None,
                            head)
    step_fn = step_module
    if cfg.compile:  # torch.compile's own default mode is mode=None
        step_fn = torch.compile(step_module, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return Training(
        cfg=cfg, device=device, ctx=ctx, model=model, step_module=step_module,
        step_fn=step_fn,
        params=params, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        sync_bn=sync_bn, buffers=list(model.buffers()), conv_kernels=kernels,
        tuning_note=tuning_note,
        # Made last: after the sync-BN and memory-format conversions, and after DDP gave every process rank 0's weights.
        ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
        partial_fc=head,
    )


def sharded_head(cfg: TrainConfig, model: SiameseNet, n_classes: int, ctx: distributed.DistContext) -> PartialFC:
    """This process's shard of the --classifier-sample-rate classifier, on what --classifier-input names."""
    width = model.embedding.fc.in_features if cfg.classifier_input == "features" else cfg.embedding_dim
    return PartialFC(cfg.classifier, width, n_classes, cfg.scale, cfg.class_margin, cfg.classifier_sample_rate,
                     cfg.seed, ctx.rank, ctx.world)


def build_run(cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, overwrite: bool,
              progress: bool = True, inputs: Sequence[str | os.PathLike] = ()) -> Run:
    """Everything a run needs, checked before anything is written; then its folder, created.

    ``progress``: the decoding and kernel-measuring bars (the main process only). ``inputs``: files the run was made
    from besides its data and --pretrained (the --config file), which --force must never remove.
    """
    device = resolve_device(cfg.device, ctx.local_rank, ctx.enabled)
    run_dir = Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    # Every process checks before rank 0 creates anything, and all stop if any check fails.
    sources = existing_inputs([cfg.data, cfg.pretrained, *(cfg.eval_data or ()), *inputs])
    distributed.agree(ctx, lambda: check_run_dir(run_dir, resume, overwrite, sources))
    checkpoint = distributed.agree(ctx, lambda: load_checkpoint(run_dir / "checkpoints" / "last.pt")) if resume else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data: decoded once, identities held out for validation.
    if cfg.face_augment and augment_mode(cfg) != "face":
        raise SiamkitError(f"--face-augment applies to --augment face, and this run's augmentation is "
                           f"{augment_mode(cfg)}; add --augment face or drop --face-augment")
    progress = progress and ctx.is_main
    pretrained_run = siamkit_checkpoint(cfg.pretrained)  # read once: the data, the preprocessing and the backbone
    source = training_data(cfg, ctx.is_main, pretrained_run)
    alignment = read_alignment(source)  # None unless the data is a folder written by `siamkit align` (or chips)
    pre = preprocess_for(cfg, pretrained_run, alignment if source == cfg.data else NOT_READ)
    data = load_data(source, pre, cfg.cache_dir, cfg.cache_max_gb, progress=progress)
    cfg = fit_to_data(cfg, data, ctx.world, say=ctx.is_main)  # small data: the default hold-out and batch shrink
    train_ds, val_ds = split_identities(data, cfg.val_identities, cfg.seed)
    require_trainable(train_ds)
    eval_sets = load_eval_sets(cfg, pre)
    sampler = build_sampler(cfg, train_ds, ctx)
    total = cfg.steps or (cfg.epochs * sampler.steps_per_epoch) or DEFAULT_STEPS
    if cfg.max_steps and not cfg.steps:
        total = min(total, cfg.max_steps)
    if checkpoint is not None:
        check_resume(checkpoint, cfg, train_ds, sampler.steps_per_epoch, run_dir, pre, ctx.world)

    n_classes = train_ds.n_identities if cfg.classification_weight > 0 else 0
    training = build_training(
        cfg, n_classes, pre.channels, device, total, ctx, image_size=pre.image_size,
        conv_kernels=checkpoint.get("conv_kernels") if checkpoint is not None else None, progress=progress,
        pretrained_run=pretrained_run,
    )
    start_step, best_accuracy = restore(training, checkpoint, run_dir) if checkpoint is not None else (0, -1.0)
    if ctx.is_main:
        n_train = sum(p.numel() for p in training.params)
        n_total = sum(p.numel() for p in training.model.parameters())
        info(
            f"{len(train_ds)} training images of {train_ds.n_identities} identities"
            + (f", {len(val_ds)} held-out images of {val_ds.n_identities} identities" if val_ds else "")
            + f"; {cfg.backbone} on {device}" + distributed.describe(ctx)
            + f", {n_train:,} of {n_total:,} parameters train; {total} steps ({sampler.steps_per_epoch} per epoch)"
            + _alignment_note(alignment)
            + (f"; beyond the box {list(pre.fill_box)} of each image, where most of its photos ended, filled from "
               f"the box's edge (--photo-box auto)" if pre.fill_box else "")
        )
        if training.tuning_note:
            info(training.tuning_note)
        if training.partial_fc is not None:
            info(training.partial_fc.describe())
    in_memory = keep_in_memory(cfg.data_in_memory, train_ds, device, ctx.is_main)
    if ctx.is_main:  # created only now that data and model are known good
        make_run_folder(run_dir, cfg, ctx.world, resume=resume, overwrite=overwrite)
    stream = None if in_memory else BatchPrefetcher(train_ds.images, lambda s: sampler.batch(s).reshape(-1), device)
    return Run(
        cfg=cfg, ctx=ctx, device=device, run_dir=run_dir, pre=pre, train_ds=train_ds, val_ds=val_ds, sampler=sampler,
        total=total, training=training, images=train_ds.images.to(device) if in_memory else None,
        labels=torch.from_numpy(train_ds.labels).to(device), stream=stream, start_step=start_step,
        best_accuracy=best_accuracy, resumed=checkpoint is not None, log_window=(checkpoint or {}).get("log_window"),
        alignment=alignment,
        augmentation=AUGMENTATIONS.lookup(augment_mode(cfg))(pre.image_size, cfg.face_augment), eval_sets=eval_sets,
    )


def _alignment_note(alignment: dict | None) -> str:
    if is_dlib_chip(alignment):
        return "; dlib's 150 px face chips cut from the photos (the model cuts them itself at every use)"
    if alignment:
        return (f"; faces aligned by siamkit align ({alignment['size']}x{alignment['size']}, margin "
                f"{alignment['margin']}): use --align on raw photos")
    return ""


def free_memory(device: torch.device) -> int:
    """Bytes free for the training images: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def keep_in_memory(choice: str, train_ds: IdentityDataset, device: torch.device, say: bool = True) -> bool:
    """--data-in-memory: the training images on the device (yes), streamed from the cache (no), or by size (auto)."""
    streamable = not isinstance(train_ds.images, torch.Tensor)  # the decoded cache's ImageRows, or a .rec's RecordRows
    origin = "the decoded cache" if isinstance(train_ds.images, ImageRows) else train_ds.root
    need = len(train_ds) * int(np.prod(tuple(train_ds.shape_of_image)))
    free = free_memory(device)
    size = f"{need / 2**30:.2f} GiB of training images"
    if not streamable:  # decoded into memory already (a built-in source, or --cache-dir none)
        if choice == "no" and say:
            info(f"--data-in-memory no: {train_ds.root or 'this source'} is a built-in data set or not cached "
                 f"(--cache-dir none); its {size} stay in memory")
        return True
    if choice == "yes":
        if need > free:
            raise SiamkitError(f"--data-in-memory yes: {size} do not fit in the {free / 2**30:.1f} GiB free on "
                               f"{device}; pass --data-in-memory no (each step's images are read from {origin})")
        return True
    if choice == "no":
        if say:
            info(f"{size} streamed from {origin} (--data-in-memory no)")
        return False
    fits = need <= MAX_IN_MEMORY_SHARE * free
    if say:
        info(f"{size}: {'kept on ' + str(device) if fits else 'streamed from ' + origin} "
             f"(--data-in-memory auto: {'under' if fits else 'over'} half of the {free / 2**30:.1f} GiB free)")
    return fits


def build_sampler(cfg: TrainConfig, train_ds: IdentityDataset, ctx: distributed.DistContext) -> PKSampler | TupleSampler:
    if not cfg.pk_batches:
        return TupleSampler(train_ds.labels, cfg.n_branches, cfg.batch_size, cfg.seed, ctx.rank, ctx.world)
    if cfg.identities_per_batch * cfg.images_per_identity * ctx.world > len(train_ds):
        raise SiamkitError(
            f"a PK batch of P={cfg.identities_per_batch} x K={cfg.images_per_identity} images"
            + (f" x {ctx.world} processes" if ctx.world > 1 else "")
            + f" is larger than the {len(train_ds)} training images; pass a smaller P or K"
        )
    return PKSampler(train_ds.labels, cfg.identities_per_batch, cfg.images_per_identity, cfg.seed, ctx.rank, ctx.world)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse to touch an earlier run unless asked, and anything but a run siamkit made even then (outputs.py);
    nothing is left behind here."""
    if resume and overwrite:
        raise SiamkitError("--resume continues a run and --force replaces it: pass only one of them")
    if overwrite:
        check_replace_run(run_dir, inputs)
    if not resume:
        check_not_input(run_dir, inputs)
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise SiamkitError(f"--resume: {run_dir}/checkpoints/last.pt does not exist, so there is nothing to resume; "
                               f"pass --force instead to start the run again, or the --out of an earlier run")
        probe = run_dir / "checkpoints"
    else:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
            # A folder without a checkpoint (a run stopped before its first one) has nothing --resume could continue.
            can_resume = (run_dir / "checkpoints" / "last.pt").is_file()
            raise SiamkitError(
                f"run folder {run_dir} already exists; "
                + ("pass --resume to continue it, --force to replace it" if can_resume else
                   "it holds no checkpoint to resume (checkpoints/last.pt); pass --force to start it again")
                + ", or another --out"
            )
        probe = run_dir if run_dir.is_dir() else next((p for p in run_dir.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise SiamkitError(f"cannot create the run folder {run_dir}: {probe} is a file, not a folder; pass another --out")
    # Create and delete a file: os.access says yes to root even on read-only or virtual file systems.
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise SiamkitError(
            f"cannot write the run folder {run_dir}: {probe} is not writable ({e.strerror}); pass another --out"
        ) from None


def make_run_folder(run_dir: Path, cfg: TrainConfig, world: int, *, resume: bool, overwrite: bool) -> None:
    """The run folder with siamkit's marker, checkpoints/ and config.json (a run replaced with --force, which
    check_run_dir allowed, is removed first)."""
    ckpt_dir = run_dir / "checkpoints"
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
        shutil.rmtree(run_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(ckpt_dir, e) from e
    remove_stale_temp_files(ckpt_dir)
    if not resume or not (run_dir / RUN_MARKER).exists():
        write_run_marker(run_dir)
    atomic_write_json(run_dir / "config.json", {**cfg.to_dict(), "siamkit_version": __version__, "world_size": world})


def restore(training: Training, checkpoint: dict[str, Any], run_dir: Path) -> tuple[int, float]:
    """Load a checkpoint's model (and EMA), optimizer, schedule, scaler and random states; -> (step, best accuracy).

    A run resumed with --ema-decay from a checkpoint without an average starts one from the restored weights.
    """
    # With an EMA, "model" holds the averaged weights (what a run is used with) and "trained_model" the optimizer's.
    trained = checkpoint.get("trained_model", checkpoint["model"])
    averaged, optimizer_state = checkpoint["model"], checkpoint["optimizer"]
    try:
        if training.partial_fc is not None:  # this process's rows of the whole classifier the checkpoint holds
            trained, optimizer_state = take_shard(training.partial_fc, training.optimizer, trained, optimizer_state)
            averaged = {k: v for k, v in averaged.items() if k != HEAD_KEY}
        training.model.load_state_dict(trained)
        if training.ema is not None and "ema" in checkpoint:
            training.ema.load(averaged, checkpoint["ema"]["updates"])
        elif training.ema is not None:  # --ema-decay added on resume: the average starts at the restored weights
            training.ema.load(training.model.state_dict(), 0)
    except (RuntimeError, KeyError, ValueError):
        raise SiamkitError(
            f"--resume: the model in {run_dir} was trained with other model options; pass the same options"
        ) from None
    training.optimizer.load_state_dict(optimizer_state)
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    training.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return int(checkpoint["step"]), float(checkpoint.get("best_accuracy", -1.0))


def check_resume(checkpoint: dict, cfg: TrainConfig, train_ds: IdentityDataset, steps_per_epoch: int, run_dir: Path,
                 pre: Preprocess, world: int = 1) -> None:
    """Refuse to continue a run on other data (the draws would differ) or other pixels; warn about changed options."""
    saved = checkpoint.get("sampler", {})
    if list(checkpoint.get("identities", train_ds.names)) != list(train_ds.names) or saved.get(
        "steps_per_epoch", steps_per_epoch
    ) != steps_per_epoch:
        saved_world = saved.get("world", world)
        processes = "" if saved_world == world else f", on {world} process(es) where the run had {saved_world}"
        raise SiamkitError(
            f"--resume: the training data differs from the run in {run_dir} "
            f"({train_ds.n_identities} identities, {steps_per_epoch} steps per epoch now{processes}); "
            f"pass the same --data, --val-identities, --seed and batch options as the run"
            + (" and its number of processes" if processes else "")
        )
    if "preprocess" in checkpoint and Preprocess.from_dict(checkpoint["preprocess"]) != pre:
        raise SiamkitError(
            f"--resume: the run in {run_dir} saw its images preprocessed as {checkpoint['preprocess']}, now they would be "
            f"{pre.to_dict()}; pass the run's --image-size, --center-crop, --grayscale and --photo-box"
        )
    old = checkpoint.get("config", {})
    changed = [
        f"--{k.replace('_', '-')} {old[k]} -> {v}"
        for k, v in cfg.to_dict().items()
        if k in old and k != "out" and old[k] != v
    ]
    if changed:
        warn(f"--resume with options other than the run's: {', '.join(changed)}; the run continues with the new ones")
