"""Never lose a run: `siamkit train` killed (SIGKILL), stopped (SIGTERM) or interrupted (Ctrl-C, twice) at an
arbitrary step resumes to bit-identical weights, metrics and learning-rate schedule."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siamkit import cli
from siamkit import checkpoint as checkpoint_module
from siamkit.train import state
from tiny_run import ONE_THREAD_ENV, assert_identical, load_raw, metrics_rows, one_torch_thread, tiny_args  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMPARED = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "sampler", "rng", "log_window")


def siamkit_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "siamkit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def logged_step(run_dir: Path) -> int:
    """The last step with a complete row in metrics.csv (the writer may be mid-line)."""
    try:
        text = (run_dir / "metrics.csv").read_text()
    except FileNotFoundError:
        return 0
    lines = [line for line in text.split("\n")[1:-1] if line]  # only lines that ended with a newline
    return int(lines[-1].split(",")[0]) if lines else 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, k: int, timeout: float = 300) -> None:
    """Return once the run has logged step k and written a checkpoint."""
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < k or not (run_dir / "checkpoints" / "last.pt").exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {k}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not reach step {k} in {timeout} s")
        time.sleep(0.005)


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
    k = random.Random().randint(2, STEPS - 1)
    run_dir = tmp_path / "run"
    proc = siamkit_process(*tiny_args(run_dir, steps=STEPS))
    wait_for_step(proc, run_dir, k)
    proc.send_signal(signal.SIGKILL)
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    killed_at = load_raw(run_dir / "checkpoints" / "last.pt")["step"]
    assert 1 <= killed_at < STEPS, f"kill step {k}: the checkpoint holds step {killed_at}"
    resume(run_dir, capfd)
    assert_same_run(uninterrupted, run_dir)


def test_sigterm_checkpoints_and_says_how_to_continue(uninterrupted, tmp_path, capfd):
    run_dir = tmp_path / "run"
    proc = siamkit_process(*tiny_args(run_dir, steps=STEPS))
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
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


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, monkeypatch, capsys):
    real_save, pressed = state.save_checkpoint, []

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        if state["step"] == 2 and path.name == "last.pt" and not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C (once) during step 3

    monkeypatch.setattr(state, "save_checkpoint", save_then_ctrl_c)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(tiny_args(run_dir, steps=STEPS))
    assert info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"siamkit: SIGINT received: stopped after step 2 of {STEPS}; checkpoint saved to "
        f"{run_dir / 'checkpoints' / 'last.pt'}; continue with the same command plus --resume"
    )
    assert load_raw(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_second_ctrl_c_exits_at_once_without_damage(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for a clean stop; the second one lands while last.pt is being rewritten."""
    real_save, real_atomic_write = state.save_checkpoint, checkpoint_module.atomic_write
    kept: dict[str, bytes] = {}

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        if state["step"] == 2 and path.name == "last.pt" and not kept:
            kept["last.pt"] = path.read_bytes()
            os.kill(os.getpid(), signal.SIGINT)

    def write_half_then_ctrl_c(path, write, hint=""):
        if not kept:
            return real_atomic_write(path, write, hint)

        def interrupted(f):
            import io

            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here, long before this ends
            f.write(buf.getvalue()[len(buf.getvalue()) // 2 :])

        return real_atomic_write(path, interrupted, hint)

    monkeypatch.setattr(state, "save_checkpoint", save_then_ctrl_c)
    monkeypatch.setattr(checkpoint_module, "atomic_write", write_half_then_ctrl_c)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    assert cli.main(tiny_args(run_dir, steps=STEPS)) == 130
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "siamkit: interrupted; files written so far are intact (checkpoints are replaced atomically)"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.pt").read_bytes() == kept["last.pt"]  # the step-2 checkpoint, untouched
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]  # no half-written temporary file
    assert load_raw(ckpts / "last.pt")["step"] == 2
