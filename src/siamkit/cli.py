"""Command line: siamkit train | evaluate | verify | embed."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .config import (
    ACTIVATIONS, AMP_MODES, AUGMENTS, BACKBONES, BN_POLICIES, CLASSIFIERS, CPU_ALLOCATORS, FREEZE_STAGES, LOSSES,
    MINING, SCHEDULES, TrainConfig,
)
from .errors import SiamkitError


class _Parser(argparse.ArgumentParser):
    """argparse, but bad options end in one 'siamkit: error:' line like every other error."""

    def error(self, message: str):
        raise SiamkitError(f"{message} (see siamkit {self.prog.split()[-1]} --help)")


def _train_parser(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a Siamese network, then evaluate it on held-out identities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="folder with one sub-folder per identity, or digits | olivetti | lfw")
    g.add_argument("--val-identities", type=float, default=d.val_identities,
                   help="identities held out for validation: a fraction < 1 or a count")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size (default: 32x32 for digits, 64x64 otherwise)")
    g.add_argument("--center-crop", type=float, default=None, help="keep this fraction of the shorter side (lfw: 0.5)")
    g.add_argument("--grayscale", action="store_true", help="train on one channel")
    g.add_argument("--augment", choices=AUGMENTS, default=d.augment,
                   help="auto = none for digits, flip-shift (mirror + small shifts) otherwise")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    g.add_argument("--pretrained", default=d.pretrained, help="none | imagenet | PATH to a torchvision state dict")
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    g.add_argument("--embedding-activation", choices=ACTIVATIONS, default=d.embedding_activation)
    g = p.add_argument_group("loss and sampling")
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--margin", type=float, default=None, help="default: 1.0 contrastive, 0.2 triplet")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="tuples per step, per process")
    g.add_argument("--identities-per-batch", type=int, default=0, metavar="P", help="PK batches: P identities...")
    g.add_argument("--images-per-identity", type=int, default=0, metavar="K", help="...with K images each")
    g.add_argument("--mining", choices=MINING, default=d.mining, help="online mining on PK batches")
    g = p.add_argument_group("multi-branch training")
    g.add_argument("--bn-policy", choices=BN_POLICIES, default=d.bn_policy)
    g.add_argument("--classification-weight", type=float, default=d.classification_weight,
                   help="weight W of the classification loss on every branch (0 = no classifier)")
    g.add_argument("--classifier", choices=CLASSIFIERS, default=d.classifier)
    g.add_argument("--scale", type=float, default=d.scale, help="ArcFace/CosFace scale s")
    g.add_argument("--class-margin", type=float, default=d.class_margin, help="ArcFace/CosFace margin m")
    g.add_argument("--freeze-until", choices=FREEZE_STAGES, default=d.freeze_until)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--betas", type=float, nargs=2, default=d.betas)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--steps", type=int, default=0, help="total steps of the run (default: 200 unless --epochs)")
    g.add_argument("--epochs", type=int, default=0, help="total epochs of the run")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp)
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument(
        "--native-conv-backward", action="store_true",
        help="use PyTorch's own convolution weight gradients everywhere (default: a faster one for small maps on CPU)",
    )
    g.add_argument(
        "--cpu-allocator", choices=CPU_ALLOCATORS, default=d.cpu_allocator,
        help="on CPU, cached keeps freed memory in the process for the next step; system leaves malloc as it is",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate held-out identities every N steps and keep best.pt")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps)
    g.add_argument("--eval-flip", action="store_true", help="add mirrored images' embeddings at evaluation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over the global batch of all processes (SyncBatchNorm)")
    g.add_argument("--gather-embeddings", action="store_true",
                   help="PK batches: mining and the metric loss see every process's embeddings")


def _train(args) -> int:
    from .train.loop import train

    cfg = TrainConfig.from_dict(vars(args))  # the parser's other options (--resume, ...) are not config
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _evaluate(args) -> int:
    from .api import load_model
    from .data.sources import load_source
    from .data.transforms import Preprocess
    from .eval.protocol import evaluate
    from .eval.report import format_summary, write_report
    from .train.checkpoint import resolve_checkpoint, run_dir_of
    from .train.loop import resolve_device
    from .train.distributed import DistContext

    device = resolve_device(args.device, DistContext())
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    out = Path(args.out) if args.out else run_dir_of(resolve_checkpoint(args.run)) / "eval"
    ds = load_source(args.data, pre)
    score = args.score or ckpt.get("score", "cosine")
    report, scores, same = evaluate(
        model, pre, ds, pairs_file=args.pairs, score=score, flip=args.flip, device=device, seed=args.seed
    )
    write_report(report, scores, same, out)
    print(f"{args.data}: {out / 'report.json'}")
    print(format_summary(report))
    return 0


def _verify(args) -> int:
    from .api import load

    verifier = load(args.run, device="cpu")
    threshold = args.threshold if args.threshold is not None else verifier.threshold
    if threshold is None:
        raise SiamkitError(f"{args.run} has no calibrated threshold (trained without held-out identities); pass --threshold")
    s = verifier.score(args.image1, args.image2)
    print(f"score {s:.4f}  threshold {threshold:.4f}  {'SAME' if s >= threshold else 'DIFFERENT'}")
    return 0


def _embed(args) -> int:
    import io

    import numpy as np

    from .api import load_model
    from .data.sources import load_source
    from .data.transforms import Preprocess
    from .eval.embed import embed_images
    from .fileio import atomic_write_bytes
    from .train.loop import resolve_device
    from .train.distributed import DistContext

    if not args.out.endswith(".npz"):
        raise SiamkitError(f"--out {args.out} must end in .npz")
    device = resolve_device(args.device, DistContext())
    model, ckpt = load_model(args.run, device)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    ds = load_source(args.data, pre)
    emb = embed_images(model, ds.images, pre, device, flip=args.flip)
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, labels=ds.labels, names=np.array(ds.names), paths=np.array(ds.paths))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"{len(emb)} embeddings of dimension {emb.shape[1]} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="siamkit", description="Train and evaluate Siamese networks for verification.")
    parser.add_argument("--version", action="version", version=f"siamkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)

    p = sub.add_parser("evaluate", help="verification report of a trained model on a data set")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data", required=True, help="folder of identity sub-folders, or digits | olivetti | lfw")
    p.add_argument("--pairs", default=None, help="LFW-format pairs.txt (folds = its sets)")
    p.add_argument("--flip", action="store_true", help="add the embedding of the mirrored image")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.add_argument("--score", choices=("cosine", "euclidean"), default=None, help="default: the model's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the impostor pairs (no --pairs)")

    p = sub.add_parser("verify", help="do two images show the same identity?")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--threshold", type=float, default=None, help="default: the threshold calibrated in training")

    p = sub.add_parser("embed", help="write embeddings of a data set to an .npz file")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="FILE.npz")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    # The command line speaks in one-line messages: Pillow's warnings about a file (decompression bomb, truncated
    # TIFF) only repeat what siamkit's own "skipped" line says, with a source line attached.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    try:
        args = build_parser().parse_args(argv)
        return {"train": _train, "evaluate": _evaluate, "verify": _verify, "embed": _embed}[args.command](args)
    except SiamkitError as e:
        print(f"siamkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file siamkit writes is replaced atomically: an interrupt leaves the old or the new one, never half.
        print("siamkit: interrupted; files written so far are intact (checkpoints are replaced atomically)", file=sys.stderr)
        return 130
    except OSError as e:
        # Last resort for a file problem no check foresaw: still one line, never a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"siamkit: error: {where}{e.strerror or e}; check the path, its permissions and the free disk space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
