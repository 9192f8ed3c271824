"""Never lose a run: `siamkit train` killed (SIGKILL), stopped (SIGTERM) or interrupted (Ctrl-C, twice) at an
arbitrary step resumes to bit-identical weights, metrics and learning-rate schedule."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from siamkit import accel, cli, kernel_choice
from siamkit import checkpoint as checkpoint_module
from siamkit.train import state
from siamkit.train.loop import train
from tiny_run import ONE_THREAD_ENV, assert_identical, load_raw, metrics_rows, one_torch_thread, tiny_args, tiny_config  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMPARED = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "sampler", "rng", "log_window")


def siamkit_process(*args: str, signal_after: tuple[str, int] | None = None) -> subprocess.Popen:
    """``siamkit ARGS`` in a subprocess; ``signal_after=(SIGNAL, k)``: it sends itself SIGNAL after checkpoint k."""
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONPATH": str(REPO / "src")}
    if signal_after is None:
        command = ["-m", "siamkit", *args]
    else:
        command = [str(Path(__file__).with_name("_signal_after_checkpoint.py")), signal_after[0], str(signal_after[1]), *args]
    return subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def resume(run_dir: Path, capfd) -> None:
    """``siamkit train ... --resume``, in this process (the killed run was another one): it starts faster."""
    capfd.readouterr()
    assert cli.main([*tiny_args(run_dir, steps=STEPS), "--resume"]) == 0
    assert "warning" not in capfd.readouterr().err


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    ref, got = load_raw(ref_dir / "checkpoints" / "last.pt"), load_raw(run_dir / "checkpoints" / "last.pt")
    for key in COMPARED:
        assert_identical(ref[key], got[key], key)
    rows_ref, rows_got = metrics_rows(ref_dir), metrics_rows(run_dir)
    assert [r["step"] for r in rows_got] == [str(s) for s in range(1, STEPS + 1)]
    for a, b in zip(rows_ref, rows_got):
        assert (a["step"], a["epoch"], a["loss"], a["metric"], a["lr"]) == (b["step"], b["epoch"], b["loss"], b["metric"], b["lr"])
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a killed writer's temporary file was left behind"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_torch_thread) -> Path:
    """The same command, never interrupted (in this process, on one thread like the subprocesses)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(tiny_args(run_dir, steps=STEPS)) == 0
    return run_dir


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(uninterrupted, tmp_path, capfd):
    # Killed by itself right after checkpoint k: an outside kill races the run, which may finish first.
    k = random.Random().randint(2, STEPS - 1)
    run_dir = tmp_path / "run"
    proc = siamkit_process(*tiny_args(run_dir, steps=STEPS), signal_after=("SIGKILL", k))
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    killed_at = load_raw(run_dir / "checkpoints" / "last.pt")["step"]
    assert killed_at == k, f"kill step {k}: the checkpoint holds step {killed_at}"
    resume(run_dir, capfd)
    assert_same_run(uninterrupted, run_dir)


def test_sigterm_checkpoints_and_says_how_to_continue(uninterrupted, tmp_path, capfd):
    run_dir = tmp_path / "run"
    proc = siamkit_process(*tiny_args(run_dir, steps=STEPS), signal_after=("SIGTERM", 2))
    rc, err = finish(proc)
    assert rc == 143, err
    saved = load_raw(run_dir / "checkpoints" / "last.pt")
    stopped = saved["step"]
    assert 2 <= stopped <= STEPS
    assert err.splitlines()[-1] == (
        f"siamkit: SIGTERM received: stopped after step {stopped} of {STEPS}; checkpoint saved to "
        f"{run_dir / 'checkpoints' / 'last.pt'}; continue with the same command plus --resume"
    )
    assert "Traceback" not in err
    assert [r["step"] for r in metrics_rows(run_dir)] == [str(s) for s in range(1, stopped + 1)]
    resume(run_dir, capfd)
    assert_same_run(uninterrupted, run_dir)


def ctrl_c() -> None:
    """Press Ctrl-C: SIGINT to this process's main thread, whose Python handler has run when this returns.

    Sent to the main thread, not to the process (os.kill): POSIX lets the kernel hand a process-directed
    signal to any thread that does not block it (a full suite leaves many: torch, gloo, inductor's
    compile pool), and Python would then run the handler whenever the main thread next checks, possibly
    a step later. pthread_kill names the thread, and CPython runs the handler before it returns.
    """
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, monkeypatch, capsys):
    real_save, pressed = state.save_checkpoint, []

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        if state["step"] == 2 and path.name == "last.pt" and not pressed:
            pressed.append(True)
            ctrl_c()  # the user presses Ctrl-C (once) after the checkpoint of step 2
            handler = signal.getsignal(signal.SIGINT)
            assert getattr(handler, "__self__", None) is not None and handler.__self__.signal_name == "SIGINT", (
                "the training loop's SIGINT handler did not run at the Ctrl-C"
            )

    monkeypatch.setattr(state, "save_checkpoint", save_then_ctrl_c)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(tiny_args(run_dir, steps=STEPS))
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"siamkit: SIGINT received: stopped after step 2 of {STEPS}; checkpoint saved to "
        f"{run_dir / 'checkpoints' / 'last.pt'}; continue with the same command plus --resume"
    ), err
    assert load_raw(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_second_ctrl_c_exits_at_once_without_damage(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for a clean stop; the second one lands while last.pt is being rewritten."""
    real_save, real_atomic_write = state.save_checkpoint, checkpoint_module.atomic_write
    kept: dict[str, bytes] = {}
    ran_on_after_second_ctrl_c = []

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        if state["step"] == 2 and path.name == "last.pt" and not kept:
            kept["last.pt"] = path.read_bytes()
            ctrl_c()

    def write_half_then_ctrl_c(path, write, hint=""):
        if not kept:
            return real_atomic_write(path, write, hint)

        def interrupted(f):
            import io

            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            ctrl_c()  # the handler raises KeyboardInterrupt here
            ran_on_after_second_ctrl_c.append(True)
            f.write(buf.getvalue()[len(buf.getvalue()) // 2 :])

        return real_atomic_write(path, interrupted, hint)

    monkeypatch.setattr(state, "save_checkpoint", save_then_ctrl_c)
    monkeypatch.setattr(checkpoint_module, "atomic_write", write_half_then_ctrl_c)
    run_dir = tmp_path / "run"
    assert cli.main(tiny_args(run_dir, steps=STEPS)) == 130
    # At once: nothing ran on after the second Ctrl-C (checked by what ran, not by the clock).
    assert ran_on_after_second_ctrl_c == []
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "siamkit: interrupted; files written so far are intact (checkpoints are replaced atomically)"
    ), err
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.pt").read_bytes() == kept["last.pt"]  # the step-2 checkpoint, untouched
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]  # no half-written temporary file
    assert load_raw(ckpts / "last.pt")["step"] == 2


def uninterrupted_then_crashed(tmp_path, monkeypatch, options: dict):
    """Trains ``options`` uninterrupted into tmp_path/ref, then into tmp_path/run crashing after step 2's
    checkpoint; returns the crashed run's config, for the caller to resume."""
    from tiny_run import Crash, crash_after_checkpoint

    train(tiny_config(tmp_path / "ref", **options), progress=False)
    crash_after_checkpoint(monkeypatch, 2)
    cfg = tiny_config(tmp_path / "run", **options)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    monkeypatch.undo()
    return cfg


def test_resume_on_faces_with_the_face_augmentation_is_bit_identical(att_faces, tmp_path, monkeypatch):
    """The faces recipe's per-sample augmentation draws from (seed, step) alone: a crash and --resume change nothing."""

    data = tmp_path / "faces"
    data.mkdir()
    for i in range(1, 5):
        (data / f"s{i}").symlink_to(att_faces / f"s{i}")
    options = dict(data=str(data), augment="face", identities_per_batch=4, images_per_identity=2,
                   mining="batch-hard", steps=4, log_every=1, grayscale=True)
    train(uninterrupted_then_crashed(tmp_path, monkeypatch, options), resume=True, progress=False)
    ref, got = load_raw(tmp_path / "ref" / "checkpoints" / "last.pt"), load_raw(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in COMPARED:
        assert_identical(ref[key], got[key], key)
    assert [r["loss"] for r in metrics_rows(tmp_path / "ref")] == [r["loss"] for r in metrics_rows(tmp_path / "run")]


def test_resume_with_ema_ends_with_the_same_average_as_the_uninterrupted_run(att_faces, tmp_path, monkeypatch):
    """--ema-decay on faces with the face augmentation: killed after step 2 and resumed, the run ends with the
    same trained weights, the same average (its update count included) and the same held-out report."""
    import json

    data = tmp_path / "faces"
    data.mkdir()
    for i in range(1, 7):
        (data / f"s{i}").symlink_to(att_faces / f"s{i}")
    # decay 0.5: the warm-up's 1/10, 2/11, 3/12 and then 0.5 itself (4/13 > 0.5 is false: 0.5 from update 5 on)
    options = dict(data=str(data), augment="face", identities_per_batch=4, images_per_identity=2, mining="batch-hard",
                   steps=6, log_every=1, grayscale=True, ema_decay=0.5, val_identities=2, cpu_tuning="off")
    cfg = uninterrupted_then_crashed(tmp_path, monkeypatch, options)
    assert load_raw(tmp_path / "run" / "checkpoints" / "last.pt")["ema"] == {"decay": 0.5, "updates": 2}
    train(cfg, resume=True, progress=False)
    ref, got = load_raw(tmp_path / "ref" / "checkpoints" / "last.pt"), load_raw(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in (*COMPARED, "trained_model", "ema", "threshold"):
        assert_identical(ref[key], got[key], key)
    assert got["ema"] == {"decay": 0.5, "updates": 6}
    assert not torch.equal(got["model"]["embedding.fc.weight"], got["trained_model"]["embedding.fc.weight"])
    reports = [json.loads((tmp_path / r / "eval" / "report.json").read_text()) for r in ("ref", "run")]
    assert reports[0] == reports[1]


def test_resume_takes_the_convolution_kernels_of_the_checkpoint_without_measuring(tmp_path, monkeypatch):
    """--cpu-tuning auto: the kernels chosen at the start are stored, and a resumed run computes with the same ones."""
    def swap_faster(shape):
        measured.append(shape)
        return {kernel_choice.PYTORCH: 2.0, kernel_choice.SWAPPED: 1.0}

    swapped_backwards = []
    backward = accel._WeightGradByForwardConv.backward
    monkeypatch.setattr(accel._WeightGradByForwardConv, "backward",
                        staticmethod(lambda ctx, g: swapped_backwards.append(1) or backward(ctx, g)))
    measured: list = []
    monkeypatch.setattr(kernel_choice, "measure_shape", swap_faster)
    run_dir = tmp_path / "run"
    # A cache folder of its own, and another, empty one for the resumed run: only the checkpoint can spare it a measurement.
    train(tiny_config(run_dir, steps=2, cache_dir=str(tmp_path / "cache")), progress=False)
    saved = load_raw(run_dir / "checkpoints" / "last.pt")["conv_kernels"]
    assert measured and sorted(saved) == sorted(s.key() for s in measured) and set(saved.values()) == {"swapped"}
    assert swapped_backwards

    monkeypatch.setattr(kernel_choice, "measure_shape", lambda shape: pytest.fail(f"measured {shape} on resume"))
    swapped_backwards.clear()
    train(tiny_config(run_dir, steps=4, cache_dir=str(tmp_path / "empty_cache")), resume=True, progress=False)
    assert load_raw(run_dir / "checkpoints" / "last.pt")["conv_kernels"] == saved
    assert swapped_backwards  # the resumed steps took the swap, as the first ones did
    assert f"{len(saved)} from the checkpoint" in (run_dir / "train.log").read_text()
