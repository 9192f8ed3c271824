"""Progress in a log file: plain lines at most every EVERY_S seconds, never carriage returns; tqdm on a terminal."""
from __future__ import annotations

import io
import sys

from tqdm import tqdm

from siamkit.config import TrainConfig
from siamkit.train import progress as progress_module
from siamkit.train.loop import train
from siamkit.train.progress import PlainProgress, progress_bar

from tiny_run import TINY, one_torch_thread  # noqa: F401  (fixture)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_at_most_every_interval_and_one_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    bar = PlainProgress(100, 0, "train", stream=out, every_s=15.0, clock=clock)
    with bar:
        for step in range(1, 101):
            clock.now = float(step)  # one step per second
            bar.update(1)
            bar.set_postfix(loss=f"{1 / step:.4f}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # written at 15, 30, ..., 90 s (each 15 s after the previous line), and at the end
    assert [line.split(":")[1].split()[0] for line in lines] == ["15/100", "30/100", "45/100", "60/100", "75/100",
                                                                 "90/100", "100/100"]
    # at 30 s, 30 steps done: 1 step/s, 70 steps = 70 s left; the postfix is the one set after step 29 (1/29),
    # since the loop sets it after each update, as siamkit's training loop does
    assert lines[1] == "train: 30/100 (30%), 00:30 elapsed, 1.00 it/s, 01:10 left, loss=0.0345"
    assert lines[-1] == "train: 100/100 (100%), 01:40 elapsed, loss=0.0100"


def test_set_postfix_writes_nothing_and_close_writes_once():
    clock, out = FakeClock(), io.StringIO()
    bar = PlainProgress(10, 4, "train", stream=out, clock=clock)  # resumed at step 4
    bar.set_postfix(loss="1.0")
    assert out.getvalue() == ""
    clock.now = 3725.0
    bar.update(2)  # 2 steps in 3725 s since the start: past the interval, so a line
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == [
        "train: 6/10 (60%), 1:02:05 elapsed, 0.00 it/s, 2:04:10 left, loss=1.0",
        "train: 6/10 (60%), 1:02:05 elapsed, 0.00 it/s, 2:04:10 left, loss=1.0",
    ]


def test_tqdm_on_a_terminal_plain_lines_elsewhere_nothing_when_disabled():
    terminal, log = Terminal(), io.StringIO()
    on_terminal = progress_bar(5, 0, "train", enabled=True, stream=terminal)
    assert isinstance(on_terminal, tqdm)
    on_terminal.close()
    assert "\r" in terminal.getvalue()
    assert isinstance(progress_bar(5, 0, "train", enabled=True, stream=log), PlainProgress)
    off = progress_bar(5, 0, "train", enabled=False, stream=log)
    off.update(5)
    off.close()
    assert log.getvalue() == ""


def test_training_with_standard_error_in_a_file_writes_plain_lines(tmp_path, monkeypatch):
    log = io.StringIO()  # not a terminal, like a redirected standard error
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # a line for every step, to see each one
    cfg = TrainConfig(**{**TINY, "steps": 3, "cpu_tuning": "off", "cache_dir": "none", "out": str(tmp_path / "run")})
    train(cfg, progress=True)
    text = log.getvalue()
    assert "\r" not in text
    assert [line.split(",")[0] for line in text.splitlines() if line.startswith("train: ")] == [
        "train: 1/3 (33%)", "train: 2/3 (67%)", "train: 3/3 (100%)", "train: 3/3 (100%)"]
