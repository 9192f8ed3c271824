"""The held-out report at the end of training: its second baseline (the off-the-shelf dlib model), and the switch."""
from __future__ import annotations

import json

import pytest

from tiny_run import one_torch_thread, tiny_config  # noqa: F401 (fixture)

pytest.importorskip("dlib")


@pytest.mark.parametrize("baseline_dlib", [True, False])
def test_held_out_report_has_the_dlib_baseline_unless_switched_off(tmp_path, baseline_dlib, capsys):
    from siamkit.train.loop import train

    # the built-in AT&T faces, 4 people held out (40 images): one step, the report is what is checked
    run = train(tiny_config(tmp_path / "run", data="att", val_identities=4, steps=1, checkpoint_every=1,
                            baseline_dlib=baseline_dlib), progress=False)
    report = json.loads((run / "eval" / "report.json").read_text())
    summary = capsys.readouterr().out
    assert "baseline" in report  # the raw pixels stay
    if baseline_dlib:
        dlib = report["baseline_dlib"]
        assert dlib["n_images"] == 40 and dlib["accuracy_mean"] > 0.9  # dlib's model on 4 AT&T people
        assert "dlib:      off-the-shelf dlib model" in summary and "does not beat it" in summary  # one step
    else:
        assert "baseline_dlib" not in report and "dlib:" not in summary
