"""progress.py: tqdm's bar on a terminal; off a terminal (a log file, a pipe) plain lines, never carriage returns."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from conftest import REPO
from siamkit import progress
from siamkit.cli import main
from tiny_run import ONE_THREAD_ENV, one_torch_thread, tiny_args  # noqa: F401 (fixture)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_prints_plain_lines(monkeypatch):
    log = io.StringIO()  # a file: isatty() is False
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 1e9)  # no redraw between the first and the last line
    bar = progress.progress_bar(total=500, desc="train")
    for _ in range(500):
        bar.update(1)
    bar.set_postfix(loss="0.1234", refresh=False)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train:   0%") and lines[1].startswith("train: 100%")
    assert "500/500" in lines[1] and "loss=0.1234" in lines[1]
    # a bar that does not stay (leave=False) leaves nothing off a terminal either: no blank line
    quiet = progress.progress_bar(range(3), desc="measuring", leave=False)
    list(quiet)
    assert log.getvalue().count("\n") == 3 and "\r" not in log.getvalue()


def test_off_a_terminal_at_most_one_line_a_twentieth_of_the_way(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a machine so slow that every step takes longer than it
    for _ in progress.progress_bar(range(500), desc="train"):
        pass
    lines = log.getvalue().splitlines()
    # the first line, one per 25 steps (500 / PLAIN_LINES), and the closing one: 22 lines for 500 steps
    assert len(lines) == 2 + progress.PLAIN_LINES and "\r" not in log.getvalue(), lines
    assert [int(line.split("|")[2].split("/")[0]) for line in lines] == [0, *range(25, 501, 25), 500], lines


def test_on_a_terminal_the_bar_is_tqdms(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = progress.progress_bar(total=2, desc="train", mininterval=0)
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue()  # redrawn in place, as before


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    # issue 30: the main job with stdout and stderr to a file wrote one 60 kB line of \r-joined updates
    log = tmp_path / "train.txt"
    args = [a for a in tiny_args(tmp_path / "run", steps=12, log_every=1, checkpoint_every=6) if a != "--no-progress"]
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "siamkit", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, timeout=600).returncode
    text = log.read_bytes()
    assert code == 0, text[-2000:]
    assert text.count(b"\r") == 0 and len(text) <= 8 * 1024, text[-2000:]
    assert b"train: 100%" in text  # the bar still says where the run is


def test_no_progress_hides_the_decode_and_kernel_bars(att_split, tmp_path, capfd):
    # a fresh cache folder: the images are decoded and the convolution kernels measured, each behind a bar
    args = tiny_args(tmp_path / "run", data=str(att_split[1]), steps=1, cpu_tuning="auto",
                     cache_dir=str(tmp_path / "cache"))
    assert "--no-progress" in args
    capfd.readouterr()
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "decoded 100 images into the cache" in err  # the decoding happened...
    assert "measured on this machine" in err  # ...and so did the measuring
    assert "decode:" not in err and "measuring convolution kernels" not in err and "\r" not in err  # ...without bars
