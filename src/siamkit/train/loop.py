"""The training loop, top to bottom: config -> data -> model -> optimizer -> loop -> evaluation."""
from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..config import TrainConfig
from ..data.samplers import PKSampler, TupleSampler
from ..data.sources import IdentityDataset, default_preprocess, load_source, require_trainable, split_identities
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, augment, normalize
from ..errors import SiamkitError, warn
from ..eval.protocol import evaluate
from ..eval.report import format_summary, write_report
from ..fileio import atomic_write_json, write_error
from ..losses import JointLoss, build_metric_loss
from ..models.conv_backward import use_small_map_conv_backward
from ..models.siamese import ModelSpec, SiameseNet
from . import cpu_memory, distributed
from .checkpoint import (
    load_checkpoint, prune_checkpoints, remove_stale_temp_files, rng_state, save_checkpoint, set_rng_state,
)
from .logging import MetricsLog
from .step import TrainStep, build_optimizer, gradient_norm
from .sync_bn import convert_to_sync_bn

# Step budget when neither --steps nor --epochs is given.
DEFAULT_STEPS = 200


class StopRequested:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit; a second Ctrl-C exits at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def resolve_device(name: str, ctx: distributed.DistContext) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SiamkitError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        if ctx.enabled and name != "cuda":
            raise SiamkitError(f"--device {name}: under torchrun each process uses GPU LOCAL_RANK; pass --device cuda or auto")
        return torch.device("cuda", ctx.local_rank) if name == "cuda" else torch.device(name)
    return torch.device("cpu")


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an earlier run unless asked; nothing is left behind here."""
    if resume and overwrite:
        raise SiamkitError("--resume continues a run and --overwrite replaces it: pass only one of them")
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise SiamkitError(f"--resume: {run_dir}/checkpoints/last.pt does not exist; pass the --out of an earlier run")
        probe = run_dir / "checkpoints"
    else:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
            raise SiamkitError(
                f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
                f"or another --out"
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


def build_model(cfg: TrainConfig, n_classes: int, in_channels: int) -> SiameseNet:
    spec = ModelSpec(
        backbone=cfg.backbone,
        in_channels=in_channels,
        embedding_dim=cfg.embedding_dim,
        embedding_activation=cfg.embedding_activation,
        n_classes=n_classes,
        classifier=cfg.classifier,
        scale=cfg.scale,
        class_margin=cfg.class_margin,
        bn_policy=cfg.bn_policy,
        freeze_until=cfg.freeze_until,
    )
    model = SiameseNet(spec, cfg.pretrained)
    if not cfg.native_conv_backward:
        use_small_map_conv_backward(model.backbone)
    return model


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


def _augment_mode(cfg: TrainConfig) -> str:
    if cfg.augment != "auto":
        return cfg.augment
    return "none" if cfg.data == "digits" else "flip-shift"  # mirrored digits are other symbols


def _preprocess(cfg: TrainConfig) -> Preprocess:
    pre = default_preprocess(cfg.data, cfg.image_size, cfg.center_crop, cfg.grayscale)
    if cfg.pretrained != "none":
        # ImageNet weights expect ImageNet's statistics.
        c = pre.channels
        mean = IMAGENET_MEAN if c == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if c == 3 else (sum(IMAGENET_STD) / 3,)
        pre = Preprocess(pre.image_size, pre.center_crop, c, mean, std)
    return pre


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Train a run to completion (or to a stop signal) and evaluate its held-out identities."""
    cfg.validate()
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, resume=resume, overwrite=overwrite, progress=progress)
    except Exception as e:
        if ctx.enabled and distributed.is_comm_failure(e):
            raise SiamkitError(distributed.comm_failure_message(ctx, e)) from None
        raise
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, overwrite: bool, progress: bool) -> Path:
    device = resolve_device(cfg.device, ctx)
    run_dir = Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    # Every process checks before rank 0 creates anything, and all stop if any check fails.
    distributed.agree(ctx, lambda: _check_run_dir(run_dir, resume, overwrite))
    checkpoint = distributed.agree(ctx, lambda: load_checkpoint(run_dir / "checkpoints" / "last.pt")) if resume else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.cpu_allocator == "cached":
        cpu_memory.keep_freed_memory()  # each step reuses the last step's activation memory
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data: decoded once, identities held out for validation.
    pre = _preprocess(cfg)
    dataset = load_source(cfg.data, pre)
    train_ds, val_ds = split_identities(dataset, cfg.val_identities, cfg.seed)
    require_trainable(train_ds)
    if cfg.pk_batches:
        batch_images = cfg.identities_per_batch * cfg.images_per_identity * ctx.world
        if batch_images > len(train_ds):
            raise SiamkitError(
                f"a PK batch of P={cfg.identities_per_batch} x K={cfg.images_per_identity} images"
                + (f" x {ctx.world} processes" if ctx.world > 1 else "")
                + f" is larger than the {len(train_ds)} training images; pass a smaller P or K"
            )
        sampler = PKSampler(train_ds.labels, cfg.identities_per_batch, cfg.images_per_identity, cfg.seed, ctx.rank, ctx.world)
    else:
        sampler = TupleSampler(train_ds.labels, cfg.n_branches, cfg.batch_size, cfg.seed, ctx.rank, ctx.world)
    total = cfg.steps or (cfg.epochs * sampler.steps_per_epoch) or DEFAULT_STEPS
    if checkpoint is not None:
        _check_resume(checkpoint, cfg, train_ds, sampler.steps_per_epoch, run_dir)

    # Model, loss, optimizer.
    n_classes = train_ds.n_identities if cfg.classification_weight > 0 else 0
    model = build_model(cfg, n_classes, pre.channels).to(device)
    sync_bn, gather = distributed.plan(cfg, ctx)
    if sync_bn:
        convert_to_sync_bn(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = JointLoss(build_metric_loss(cfg.loss, cfg.mining, cfg.resolved_margin), cfg.classification_weight)
    params = model.trainable_parameters()
    optimizer = build_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_step, best_accuracy = 0, -1.0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError:
            raise SiamkitError(
                f"--resume: the model in {run_dir} was trained with other model options; pass the same options"
            ) from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_step = int(checkpoint["step"])
        best_accuracy = float(checkpoint.get("best_accuracy", -1.0))
        set_rng_state(checkpoint["rng"])

    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    if ctx.is_main:
        print(
            f"siamkit: {len(train_ds)} training images of {train_ds.n_identities} identities"
            + (f", {len(val_ds)} held-out images of {val_ds.n_identities} identities" if val_ds else "")
            + f"; {cfg.backbone} on {device}" + distributed.describe(ctx)
            + f", {n_train:,} of {n_total:,} parameters train; "
            f"{total} steps ({sampler.steps_per_epoch} per epoch)",
            file=sys.stderr,
        )

    # Run folder: created only now that data and model are known good.
    ckpt_dir = run_dir / "checkpoints"
    if ctx.is_main:
        if overwrite and run_dir.exists() and not resume:
            shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(ckpt_dir, e) from e
        remove_stale_temp_files(ckpt_dir)
        config = {**cfg.to_dict(), "siamkit_version": __version__, "world_size": ctx.world}
        atomic_write_json(run_dir / "config.json", config)
    log = MetricsLog(run_dir, resume=resume) if ctx.is_main else None
    if log is not None and resume:
        log.drop_after(start_step)

    def state(step: int, **extra) -> dict:
        return {
            "model": model.state_dict(),
            "model_spec": model.spec.to_dict(),
            "preprocess": pre.to_dict(),
            "config": cfg.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step // sampler.steps_per_epoch,
            # Samplers are pure functions of (seed, step, rank): this is all it takes to continue the same draws.
            "sampler": {
                "type": type(sampler).__name__, "seed": cfg.seed, "step": step,
                "steps_per_epoch": sampler.steps_per_epoch, "world": ctx.world,
            },
            # Loss sums since the last metrics row, so that a resumed run logs the same rows.
            "log_window": dict(window),
            "rng": rng_state(),
            "identities": list(train_ds.names),
            "score": score_for(cfg.embedding_activation),
            "best_accuracy": best_accuracy,
            **extra,
        }

    saved_step = [start_step if checkpoint is not None else None]  # the step last.pt holds

    def save(step: int, **extra) -> None:
        if ctx.is_main:
            save_checkpoint(ckpt_dir / "last.pt", state(step, **extra))
            if cfg.keep_checkpoints > 1:
                save_checkpoint(ckpt_dir / f"step-{step}.pt", state(step, **extra))
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        saved_step[0] = step
        ctx.checkpoint, ctx.checkpoint_step = ckpt_dir / "last.pt", step  # named if another process dies

    images = train_ds.images.to(device)
    labels = torch.from_numpy(train_ds.labels).to(device)
    # DDP runs the backbone passes; heads and loss run on the model itself (see TrainStep).
    runner = distributed.wrap_ddp(model, device) if ctx.enabled else None
    step_module = TrainStep(model, loss_fn, cfg.n_branches, runner, distributed.gather_with_grad if gather else None)
    step_fn = torch.compile(step_module) if cfg.compile else step_module
    aug = _augment_mode(cfg)
    shift = max(1, round(min(pre.image_size) / 16)) if aug == "flip-shift" else 0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    bad_steps, step, stopping = 0, start_step, False
    window = {"loss": 0.0, "metric": 0.0, "classification": 0.0, "n": 0}
    if checkpoint is not None and "log_window" in checkpoint:
        window = {k: type(v)(checkpoint["log_window"][k]) for k, v in window.items()}
    timed_steps = 0  # steps since t_window: images/s counts only the steps timed in this process
    t_window, t_start = time.perf_counter(), time.perf_counter()
    elapsed_before = float(log.rows[-1]["elapsed_s"]) if (log is not None and log.rows) else 0.0
    last_plot = time.perf_counter()
    bar = tqdm(total=total, initial=start_step, disable=not (progress and ctx.is_main), desc="train", dynamic_ncols=True)
    model.train()
    # BatchNorm updates its running statistics in the forward pass, before the loss is known to be finite:
    # a skipped step puts them back, so a NaN batch cannot poison the statistics used at evaluation.
    buffers = list(model.buffers())
    with StopRequested() as stop:
        while step < total and not stopping:
            if not ctx.enabled and stop.signal_name is not None:
                stopping = True  # alone, stop at once: the last step is done (with processes, decided together)
                break
            idx = torch.from_numpy(sampler.batch(step).reshape(-1)).to(device)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            x = images[idx]
            if aug != "none":
                x = augment(x, gen, flip=True, shift=shift)
            x = normalize(x, pre, cfg.channels_last)
            y = labels[idx]
            saved_buffers = [b.detach().clone() for b in buffers]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = step_fn(x, y)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = gradient_norm(params)
            # Decided together: a process skipping a step, or stopping on a signal, alone would leave
            # the others waiting at the next collective.
            bad, stopping = distributed.any_rank(
                ctx, device, ~(torch.isfinite(loss) & torch.isfinite(grad_norm)), stop.signal_name is not None
            )
            finite = not bad
            if not finite and cfg.amp != "fp16":
                bad_steps += 1
                with torch.no_grad():
                    for b, saved in zip(buffers, saved_buffers):
                        b.copy_(saved)
                if ctx.is_main:
                    warn(f"step {step + 1}: non-finite loss or gradient; step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    bar.close()
                    kept = (
                        f"the last good checkpoint {ckpt_dir / 'last.pt'} (step {saved_step[0]}) is intact"
                        if saved_step[0] is not None else "no checkpoint had been written yet"
                    )
                    raise SiamkitError(
                        f"{bad_steps} non-finite steps in a row (steps {step - bad_steps + 2}-{step + 1}): training "
                        f"stopped; {kept}; lower --lr or check the data (--max-bad-steps sets the limit)"
                    )
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step()
                bar.update(1)
                continue
            bad_steps = 0
            scaler.step(optimizer)
            scaler.update()
            if not sync_bn:
                distributed.average_running_stats(ctx, model.bn)
            scheduler.step()
            step += 1
            bar.update(1)
            window["n"] += 1
            timed_steps += 1
            for key in ("loss", "metric", "classification"):
                if key in out:
                    window[key] += float(out[key].detach())
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                n = max(1, window["n"])
                window["loss"], window["metric"], window["classification"] = distributed.mean_over_ranks(
                    ctx, device, [window["loss"], window["metric"], window["classification"]]
                )
                images_per_s = timed_steps * x.shape[0] * ctx.world / (now - t_window)
                row = {
                    "step": step,
                    "epoch": step // sampler.steps_per_epoch,
                    "loss": window["loss"] / n,
                    "metric": window["metric"] / n,
                    "classification": window["classification"] / n if "classification" in out else "",
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": images_per_s,
                    "elapsed_s": elapsed_before + now - t_start,
                }
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                if log is not None:
                    log.log(row)
                    if now - last_plot > 20:
                        log.plot()
                        last_plot = now
                window = {"loss": 0.0, "metric": 0.0, "classification": 0.0, "n": 0}
                timed_steps, t_window = 0, time.perf_counter()
            if cfg.eval_every and val_ds is not None and step % cfg.eval_every == 0 and step < total:
                report = _evaluate_held_out(model, pre, val_ds, cfg, device, sharded=ctx.enabled)
                if ctx.is_main and report["accuracy_mean"] > best_accuracy:
                    best_accuracy = report["accuracy_mean"]
                    save_checkpoint(ckpt_dir / "best.pt", state(step, threshold=report["threshold"]))
            if step % cfg.checkpoint_every == 0 and step < total:
                save(step)
        bar.close()
        if stopping:
            save(step)
            if log is not None:
                log.plot()
            signal_name = stop.signal_name or "SIGTERM"  # None: the signal reached another process
            if ctx.is_main:
                print(
                    f"siamkit: {signal_name} received: stopped after step {step} of {total}; checkpoint saved to "
                    f"{ckpt_dir / 'last.pt'}; continue with the same command plus --resume",
                    file=sys.stderr,
                )
            raise SystemExit(130 if signal_name == "SIGINT" else 143)

    # Final checkpoint, then the held-out evaluation that calibrates the threshold.
    save(step)
    if log is not None:
        log.plot()
    if val_ds is None:
        if ctx.is_main:
            print("siamkit: no identities held out (--val-identities 0): no evaluation", file=sys.stderr)
        distributed.barrier(ctx)  # return once rank 0 has written everything: the run is complete
        return run_dir
    report, scores, same = _evaluate_held_out(model, pre, val_ds, cfg, device, with_scores=True, sharded=ctx.enabled)
    if ctx.is_main:
        write_report(report, scores, same, run_dir / "eval")
        save(step, threshold=report["threshold"])
        print(f"held-out identities ({val_ds.n_identities}), {run_dir / 'eval' / 'report.json'}:")
        print(format_summary(report))
    distributed.barrier(ctx)
    return run_dir


def _check_resume(checkpoint: dict, cfg: TrainConfig, train_ds: IdentityDataset, steps_per_epoch: int, run_dir: Path) -> None:
    """Refuse to continue a run on other data (the draws would differ); warn about changed options."""
    saved = checkpoint.get("sampler", {})
    if list(checkpoint.get("identities", train_ds.names)) != list(train_ds.names) or saved.get(
        "steps_per_epoch", steps_per_epoch
    ) != steps_per_epoch:
        raise SiamkitError(
            f"--resume: the training data differs from the run in {run_dir} "
            f"({train_ds.n_identities} identities, {steps_per_epoch} steps per epoch now); "
            f"pass the same --data, --val-identities, --seed and batch options as the run"
        )
    old = checkpoint.get("config", {})
    changed = [
        f"--{k.replace('_', '-')} {old[k]} -> {v}"
        for k, v in cfg.to_dict().items()
        if k in old and k != "out" and old[k] != v
    ]
    if changed:
        warn(f"--resume with options other than the run's: {', '.join(changed)}; the run continues with the new ones")


def _evaluate_held_out(model, pre, val_ds: IdentityDataset, cfg: TrainConfig, device, with_scores=False, sharded=False):
    report, scores, same = evaluate(
        model, pre, val_ds, score=score_for(cfg.embedding_activation), flip=cfg.eval_flip, device=device,
        seed=cfg.seed, sharded=sharded,
    )
    return (report, scores, same) if with_scores else report
