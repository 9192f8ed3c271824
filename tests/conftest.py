"""Shared fixtures: where the real face data lives, and a helper to run the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real data sets (AT&T faces, ROF-neutral) live beside the repository; SIAMKIT_DATA overrides.
DATA = Path(os.environ.get("SIAMKIT_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def decoded_cache_dir(tmp_path_factory) -> Path:
    """Decoded caches of the tests go to one temporary folder, never the user's cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("siamkit_cache")
    previous = os.environ.get("SIAMKIT_CACHE_DIR")
    os.environ["SIAMKIT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SIAMKIT_CACHE_DIR", None)
    else:
        os.environ["SIAMKIT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "att_faces").is_dir():
        pytest.fail(f"real test data not found in {DATA}; set SIAMKIT_DATA to the folder holding att_faces/")
    return DATA


@pytest.fixture(scope="session")
def att_faces(data_root) -> Path:
    return data_root / "att_faces"


@pytest.fixture(scope="session")
def att_split(att_faces, tmp_path_factory) -> tuple[Path, Path]:
    """Symlinked folders of AT&T identities s1-s30 (train) and s31-s40 (held out): no copies of the data."""
    base = tmp_path_factory.mktemp("att_split")
    train, test = base / "train", base / "test"
    train.mkdir()
    test.mkdir()
    for i in range(1, 41):
        (train if i <= 30 else test).joinpath(f"s{i}").symlink_to(att_faces / f"s{i}")
    return train, test


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m siamkit ARGS`` with this checkout's package first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "siamkit", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env
    )


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to check that a failed command changed nothing."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def cli():
    return run_cli


# ---------------------------------------------------------------- a trained run and its ONNX export
# (tests/test_export.py, tests/test_exported.py)


@pytest.fixture(scope="session")
def trained_run(att_split, tmp_path_factory):
    """30 steps of resnet18 on AT&T s1-s30 at 32x32, 6 identities held out: scores spread enough that a
    decision is not a coin toss at float32 rounding (a 3-step model scores every pair about 1.0)."""
    from siamkit.train.loop import train
    from tiny_run import tiny_config

    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(out, data=str(att_split[0]), backbone="resnet18", steps=30, val_identities=6,
                      log_every=10, checkpoint_every=30), progress=False)
    return out


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """(model.onnx, what siamkit export printed)."""
    import contextlib
    import io

    from siamkit.cli import main

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(trained_run), "--out", str(path)]) == 0
    return path, out.getvalue()


@pytest.fixture(scope="session")
def onnx_file(exported):
    return exported[0]
