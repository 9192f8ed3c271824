"""An exported .onnx model through onnxruntime (exported.py): the run's decisions, in a process without torch."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("onnxruntime", reason='the export tests need the export extra: pip install -e ".[test]"')

# A meta-path finder that makes torch and torchvision unimportable, as in an environment without them.
BLOCKER = textwrap.dedent('''
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: siamkit runs here without torch)", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
''')


@pytest.fixture
def no_torch(tmp_path):
    """Environment for run_cli in which `import torch` fails (a sitecustomize on PYTHONPATH installs the blocker)."""
    import os

    from conftest import REPO

    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path / "blocker"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def python(code: str, env: dict):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_blocker_blocks(no_torch):
    r = python("import torch", no_torch)
    assert r.returncode != 0 and "blocked: siamkit runs here without torch" in r.stderr
    r = python("import torchvision.models", no_torch)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_verify_an_onnx_file_without_torch_gives_the_runs_decision(trained_run, onnx_file, att_faces, no_torch,
                                                                 capsys):
    from siamkit.cli import main

    pairs = [("s1/1.pgm", "s1/2.pgm"), ("s1/1.pgm", "s2/1.pgm"), ("s35/3.pgm", "s35/7.pgm"), ("s36/1.pgm", "s37/1.pgm")]
    for a, b in pairs:
        a, b = str(att_faces / a), str(att_faces / b)
        r = run_cli("verify", str(onnx_file), a, b, env=no_torch)
        assert r.returncode == 0, r.stderr
        assert main(["verify", str(trained_run), a, b]) == 0
        run_words, onnx_words = capsys.readouterr().out.split(), r.stdout.split()
        assert onnx_words[4] == run_words[4]  # SAME / DIFFERENT
        assert onnx_words[3] == run_words[3]  # the threshold, from the file's metadata
        # Scores printed with 4 decimals; embeddings agree to 1e-4, so the scores to within a last-digit step.
        assert float(onnx_words[1]) == pytest.approx(float(run_words[1]), abs=2e-4)
        assert "calibrated on held-out identities at the end of training" in r.stdout


def test_python_api_and_pairs_csv_without_torch(trained_run, onnx_file, att_faces, no_torch, tmp_path):
    import siamkit

    images = [str(att_faces / f"s{p}" / f"{i}.pgm") for p in (3, 4) for i in (1, 2, 3)]
    (tmp_path / "pairs.csv").write_text("".join(f"{a},{b}\n" for a in images for b in images if a < b))
    code = textwrap.dedent(f'''
        import json, sys
        import siamkit
        from siamkit.cli import main
        v = siamkit.load({str(onnx_file)!r})
        emb = v.embed({images!r})
        same = [bool(v.verify({images[0]!r}, im, far=1e-1)) for im in {images!r}]
        assert main(["verify", {str(onnx_file)!r}, "--pairs", {str(tmp_path / "pairs.csv")!r},
                     "--out", {str(tmp_path / "d.csv")!r}, "--far", "1e-1"]) == 0
        assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules)
        print(json.dumps({{"emb": emb.tolist(), "same": same}}))
    ''')
    r = python(code, no_torch)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    v = siamkit.load(trained_run)
    assert np.abs(np.array(got["emb"]) - v.embed(images)).max() < 1e-4  # the export's parity bound
    assert got["same"] == [bool(v.verify(images[0], im, far=1e-1)) for im in images]
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert rows[0] == "image1,image2,score,threshold,decision" and len(rows) == 1 + 15


def test_files_that_are_not_siamkit_exports_are_refused(onnx_file, tmp_path, no_torch):
    import onnx

    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a protobuf at all" * 10)
    model = onnx.load(str(onnx_file))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    image = str(tmp_path / "garbage.onnx")
    for path, message in [(bad, "is not a readable ONNX model"), (tmp_path / "foreign.onnx", "not one siamkit exported"),
                          (tmp_path / "missing.onnx", "does not exist")]:
        r = run_cli("verify", str(path), image, image, env=no_torch)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("siamkit: error:")


def test_identify_with_the_onnx_export_without_torch(trained_run, onnx_file, att_faces, no_torch, tmp_path, capsys):
    """A gallery enrolled with the run is searched with its ONNX export (it embeds the same), without torch."""
    from siamkit.cli import main

    folder = tmp_path / "g"
    for name in ("s31", "s32", "s33"):
        (folder / name).mkdir(parents=True)
        for i in range(1, 4):
            (folder / name / f"{i}.pgm").symlink_to(att_faces / name / f"{i}.pgm")
    assert main(["enroll", str(trained_run), "--data", str(folder), "--out", str(tmp_path / "gal"),
                 "--no-progress"]) == 0
    probes = [str(att_faces / "s32" / "7.pgm"), str(att_faces / "s38" / "7.pgm")]
    capsys.readouterr()
    assert main(["identify", str(tmp_path / "gal"), *probes, "--top-k", "3"]) == 0
    with_run = capsys.readouterr().out.splitlines()
    r = run_cli("identify", str(tmp_path / "gal"), *probes, "--top-k", "3", "--model", str(onnx_file), env=no_torch)
    assert r.returncode == 0, r.stderr
    with_onnx = r.stdout.splitlines()
    import re

    def words(line):
        return [w for w in line.split() if not re.fullmatch(r"-?\d+\.\d+[,:]?", w)]

    def numbers(line):
        return [float(w.rstrip(",:")) for w in line.split() if re.fullmatch(r"-?\d+\.\d+[,:]?", w)]

    assert len(with_run) == len(with_onnx) == 5  # two probes x (verdict, top-k) + the threshold line
    for a, b in zip(with_run, with_onnx):
        # The same identities in the same order; scores printed with 4 decimals agree within a last-digit step
        # (the export's embeddings are within 1e-4 of the run's).
        assert words(a) == words(b)
        np.testing.assert_allclose(numbers(a), numbers(b), atol=2e-4)


def test_api_load_dispatches_an_onnx_file_too(onnx_file):
    from siamkit.api import load
    from siamkit.exported import ExportedVerifier

    assert isinstance(load(onnx_file), ExportedVerifier)


def test_embed_a_folder_with_the_onnx_export_without_torch(trained_run, onnx_file, att_faces, no_torch, tmp_path):
    folder = tmp_path / "people"
    for name in ("s33", "s34"):
        (folder / name).mkdir(parents=True)
        for i in range(1, 5):
            (folder / name / f"{i}.pgm").symlink_to(att_faces / name / f"{i}.pgm")
    (folder / "s34" / "9.pgm").write_bytes(b"not an image")  # skipped with a warning, as embed with the run does
    r = run_cli("embed", str(onnx_file), "--data", str(folder), "--out", str(tmp_path / "onnx.npz"), env=no_torch)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image(s)" in r.stderr
    r = run_cli("embed", str(trained_run), "--data", str(folder), "--out", str(tmp_path / "run.npz"))
    assert r.returncode == 0, r.stderr
    a, b = np.load(tmp_path / "onnx.npz"), np.load(tmp_path / "run.npz")
    for key in ("labels", "names", "paths"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["embeddings"].shape == (8, 128) and np.abs(a["embeddings"] - b["embeddings"]).max() < 1e-4
    # The export's views are in its graph: asking for others is one line, nothing written.
    for flag in ("--shifts", "--no-flip"):
        r = run_cli("embed", str(onnx_file), "--data", str(folder), "--out", str(tmp_path / "x.npz"), flag,
                    env=no_torch)
        assert r.returncode == 2 and "drop --flip and --shifts" in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "x.npz").exists()


def test_a_damaged_onnx_export_is_refused_in_one_line(onnx_file, att_faces, tmp_path, no_torch):
    # On main 935a11e an ONNX file carried no checksum: flipped bytes in its weights gave other embeddings silently.
    damaged = tmp_path / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    middle = len(data) // 2  # inside the weights, which make up most of the file
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged.write_bytes(bytes(data))
    image = str(att_faces / "s1" / "1.pgm")
    result = run_cli("verify", str(damaged), image, image, env=no_torch)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"siamkit: error: {damaged} is damaged: its bytes do not match the sha256 stored in it at "
                             f"export (a disk or copy error changed it); export the run again with siamkit export\n")
