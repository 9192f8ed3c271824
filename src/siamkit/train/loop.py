"""The training loop, top to bottom: build the run -> step, log, evaluate, checkpoint -> held-out report."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Sequence

from ..config import TrainConfig
from ..errors import SiamkitError, info, warn
from ..eval.embed import embed_images
from ..eval.protocol import evaluate
from ..eval.report import format_summary, write_report
from ..progress import progress_bar
from . import distributed
from .ema import evaluation_weights
from .eval_sets import evaluate_sets
from .logging import LossWindow, MetricsLog, RunLogFile
from .tensorboard import TensorBoardLog, require_tensorboard
from .run import Run, build_run, score_for
from .state import Checkpoints
from .step import optimisation_step


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


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          inputs: Sequence[str] = ()) -> Path:
    """Train a run to completion (or to a stop signal) and evaluate its held-out identities.

    ``overwrite``: replace the run folder cfg.out if siamkit made it (outputs.py); ``inputs``: files the run is made
    from besides cfg.data and cfg.pretrained (the --config file), never removed by ``overwrite``.
    """
    cfg.validate()
    ctx = distributed.setup(cfg.device)
    log_file = RunLogFile(enabled=ctx.is_main)
    try:
        return _train(cfg, ctx, log_file, resume=resume, overwrite=overwrite, progress=progress, inputs=inputs)
    except Exception as e:
        if ctx.enabled and distributed.is_comm_failure(e):
            raise SiamkitError(distributed.comm_failure_message(ctx, e)) from None
        raise
    finally:
        log_file.close()
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx, log_file: RunLogFile, *, resume: bool, overwrite: bool, progress: bool,
           inputs: Sequence[str]) -> Path:
    if cfg.tensorboard:
        require_tensorboard()  # before the run folder exists
    run = build_run(cfg, ctx, resume=resume, overwrite=overwrite, progress=progress, inputs=inputs)
    try:
        return _run(run, log_file, resume=resume, progress=progress)
    finally:
        run.close()


def _run(run: Run, log_file: RunLogFile, *, resume: bool, progress: bool) -> Path:
    cfg, ctx = run.cfg, run.ctx
    log_file.open(run.run_dir)
    metrics = MetricsLog(run.run_dir, resume=resume) if ctx.is_main else None
    tb = TensorBoardLog(run.run_dir) if cfg.tensorboard and ctx.is_main else None
    if metrics is not None and resume:
        metrics.drop_after(run.start_step)
    window = LossWindow(
        run.log_window,
        float(metrics.rows[-1]["elapsed_s"]) if (metrics is not None and metrics.rows) else 0.0,
    )
    checkpoints = Checkpoints(run, window)
    step, stopping, bad_steps = run.start_step, False, 0
    bar = progress_bar(total=run.total, initial=step, disable=not (progress and ctx.is_main), desc="train", dynamic_ncols=True)
    run.training.model.train()
    with StopRequested() as stop, bar:
        while step < run.total and not stopping:
            if not ctx.enabled and stop.signal_name is not None:
                stopping = True  # alone, stop at once: the last step is done (with processes, decided together)
                break
            x, y = run.batch(step)
            result = optimisation_step(run.training, x, y, stop.signal_name is not None)
            stopping = result.stop
            step += 1
            bar.update(1)
            if result.skipped:
                bad_steps += 1
                _skipped_step(run, step, bad_steps, checkpoints)
                continue
            bad_steps = 0
            window.add(result.out)
            if step % cfg.log_every == 0 or step == run.total:
                row = window.row(ctx, run.device, step, step // run.sampler.steps_per_epoch,
                                 run.training.scheduler.get_last_lr()[0], x.shape[0], "classification" in result.out)
                # refresh=False: shown with the next redraw, never a redraw of its own (a log file gets one line per
                # PLAIN_EVERY_S, not one per row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}", refresh=False)
                if metrics is not None:
                    metrics.log(row)
                    metrics.plot_every(20.0)
                    if tb is not None:
                        tb.log(metrics.rows[-1])  # the values as metrics.csv holds them
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total:
                _periodic_evaluation(run, step, tb, checkpoints)
            if step % cfg.checkpoint_every == 0 and step < run.total:
                checkpoints.save(step)
        if stopping:
            bar.close()
            if tb is not None:
                tb.close()
            _stop(run, step, stop.signal_name, checkpoints, metrics)

    # Final checkpoint, then the --eval-data sets' reports and the held-out evaluation that calibrates the threshold.
    checkpoints.save(step)
    if metrics is not None:
        metrics.plot()
    evaluate_sets(run, score_for(cfg.embedding_activation), step, final=True)
    if run.val_ds is None:
        if tb is not None:
            tb.close()
        if ctx.is_main:
            info("no identities held out (--val-identities 0): no evaluation")
        distributed.barrier(ctx)  # return once rank 0 has written everything: the run is complete
        return run.run_dir
    report, scores, same, baseline_scores = _evaluate_held_out(run, final=True)
    if ctx.is_main:
        write_report(report, scores, same, run.run_dir / "eval", baseline_scores)
    checkpoints.save(step, threshold=report["threshold"], thresholds_at_far=report["thresholds_at_far"])
    if ctx.is_main:
        if tb is not None:
            _tensorboard_held_out(tb, run, step, report, scores, same, baseline_scores)
        print(f"held-out identities ({run.val_ds.n_identities}), {run.run_dir / 'eval' / 'report.json'}:")
        print(format_summary(report))
    distributed.barrier(ctx)
    return run.run_dir


def _periodic_evaluation(run: Run, step: int, tb: TensorBoardLog | None, checkpoints: Checkpoints) -> None:
    """Every --eval-every steps: the --eval-data sets, then the held-out identities; best.pt by the held-out accuracy,
    or by the sets' mean accuracy where no identities are held out."""
    mean = evaluate_sets(run, score_for(run.cfg.embedding_activation), step)
    # Every process decides alike (they all have the same reports) and saves: a partial-FC head's shards are gathered
    # by all of them.
    if run.val_ds is None:
        if mean is not None and mean > run.best_accuracy:
            run.best_accuracy = mean
            checkpoints.save_best(step)
        return
    report = _evaluate_held_out(run).report
    if tb is not None:
        tb.held_out(step, report)
    if report["accuracy_mean"] > run.best_accuracy:
        run.best_accuracy = report["accuracy_mean"]
        checkpoints.save_best(step, threshold=report["threshold"], thresholds_at_far=report["thresholds_at_far"])


def _skipped_step(run: Run, step: int, bad_steps: int, checkpoints: Checkpoints) -> None:
    """Warn about a skipped (non-finite) step; stop the run after --max-bad-steps of them in a row."""
    if run.ctx.is_main:
        warn(f"step {step}: non-finite loss or gradient; step skipped ({bad_steps} in a row)")
    if bad_steps >= run.cfg.max_bad_steps:
        raise SiamkitError(
            f"{bad_steps} non-finite steps in a row (steps {step - bad_steps + 1}-{step}): training "
            f"stopped; {checkpoints.describe_last()}; lower --lr or check the data (--max-bad-steps sets the limit)"
        )


def _stop(run: Run, step: int, signal_name: str | None, checkpoints: Checkpoints, metrics: MetricsLog | None) -> None:
    """After a stop signal: checkpoint, say where and how to continue, exit with 130 (SIGINT) or 143."""
    checkpoints.save(step)
    if metrics is not None:
        metrics.plot()
    signal_name = signal_name or "SIGTERM"  # None: the signal reached another process
    if run.ctx.is_main:
        info(
            f"{signal_name} received: stopped after step {step} of {run.total}; checkpoint saved to "
            f"{run.ckpt_dir / 'last.pt'}; continue with the same command plus --resume"
        )
    raise SystemExit(130 if signal_name == "SIGINT" else 143)


def _tensorboard_held_out(tb: TensorBoardLog, run: Run, step: int, report: dict, scores, same, baseline) -> None:
    """The final evaluation in TensorBoard: its metrics, the ROC, and the held-out embeddings for the projector."""
    ds = run.val_ds
    with evaluation_weights(run.training.ema):
        emb = embed_images(run.training.model, ds.images, run.pre, run.device, flip=run.cfg.eval_flip,
                           shifts=run.cfg.eval_shifts)
    tb.held_out(step, report)
    tb.roc_and_embeddings(step, report, scores, same, baseline, emb, [ds.names[i] for i in ds.labels], ds.images)
    tb.close()


def _evaluate_held_out(run: Run, final: bool = False):
    """The held-out identities' evaluation (of the EMA weights with --ema-decay); each process embeds a share in a
    distributed run. The final one adds the off-the-shelf dlib model's metrics (--no-baseline-dlib: not)."""
    with evaluation_weights(run.training.ema):
        return evaluate(
            run.training.model, run.pre, run.val_ds, score=score_for(run.cfg.embedding_activation),
            flip=run.cfg.eval_flip, shifts=run.cfg.eval_shifts, device=run.device, seed=run.cfg.seed,
            sharded=run.ctx.enabled, baseline_dlib=final and run.cfg.baseline_dlib,
        )
