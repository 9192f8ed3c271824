"""Run `siamkit ARGS` and send this process SIGNAL right after the checkpoint of STEP is written.

    python _signal_after_checkpoint.py SIGKILL 3 train --out ... (the rest of siamkit's arguments)

The resume tests kill or stop a training process at a chosen point instead of racing it from outside:
on a loaded machine a run can finish (or pass the intended step) before an outside signal lands.
"""
from __future__ import annotations

import os
import signal
import sys

from siamkit import cli
from siamkit.train import state


def main() -> int:
    name, step, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_save = state.save_checkpoint

    def save_then_signal(path, saved):
        real_save(path, saved)
        if path.name == "last.pt" and saved["step"] == step:
            os.kill(os.getpid(), getattr(signal, name))

    state.save_checkpoint = save_then_signal
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
