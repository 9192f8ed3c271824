"""Atomic writes: the target holds the old or the new bytes, never a mix; failures are one clear error."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siamkit import fileio
from siamkit.errors import SiamkitError
from siamkit.fileio import WriteError, atomic_write, atomic_write_bytes, atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_new_and_replaces_old(tmp_path):
    target = tmp_path / "sub" / "f.bin"  # the folder is created too
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    atomic_write_json(tmp_path / "c.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2]}
    assert leftovers(tmp_path / "sub") == [] and leftovers(tmp_path) == []


def test_new_file_gets_umask_mode_and_replacement_keeps_mode(tmp_path):
    old = os.umask(0o027)
    try:
        # The mode is read once at import; recompute it as a fresh import would.
        fileio._UMASK = fileio._read_umask()
        atomic_write_bytes(tmp_path / "new", b"x")
    finally:
        os.umask(old)
        fileio._UMASK = fileio._read_umask()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600
    (tmp_path / "kept").write_bytes(b"old")
    os.chmod(tmp_path / "kept", 0o604)
    atomic_write_bytes(tmp_path / "kept", b"new")
    assert (tmp_path / "kept").stat().st_mode & 0o777 == 0o604


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_content_and_no_temp(tmp_path, error):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old content")

    def half_then_fail(f):
        f.write(b"new cont")  # half of the new content reaches the temporary file
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []


def test_disk_full_becomes_one_line_write_error(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous checkpoint")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as info:
        atomic_write(target, disk_full, hint="the previous checkpoint there is intact")
    message = str(info.value)
    assert isinstance(info.value, SiamkitError) and isinstance(info.value, OSError)
    assert "\n" not in message
    assert message.startswith(f"could not write {target}: the disk holding {tmp_path} is full")
    assert "the previous checkpoint there is intact" in message
    assert target.read_bytes() == b"previous checkpoint"
    assert leftovers(tmp_path) == []


def test_fsync_failure_is_a_write_error_too(tmp_path, monkeypatch):
    # Some file systems report a full disk only when the data is flushed to it.
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", failing_fsync)
    with pytest.raises(WriteError, match="is full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_path_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match=r"could not write .*a_file/run/x\.json: .*a_file is a file, not a folder; pick another path"):
        atomic_write_json(blocker / "run" / "x.json", {})
    assert blocker.read_text() == "not a folder"


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "f", b"data")
    # File data first, then the rename, then the folder entry.
    assert events == ["fsync", "replace", "fsync"]


def test_sigkill_during_writes_never_leaves_a_torn_file(tmp_path):
    """A process rewriting a file in a loop is killed at an arbitrary moment: the file is one whole version."""
    target = tmp_path / "f.bin"
    script = (
        "import sys; from siamkit.fileio import atomic_write_bytes\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_write_bytes(sys.argv[1], bytes([i % 251]) * 2_000_000)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = target.read_bytes()
    assert len(data) == 2_000_000 and data == bytes([data[0]]) * len(data)


# --- locks and stored checksums -----------------------------------------------------------------------------------

_HOLDER = """
import sys
from siamkit.fileio import file_lock
with file_lock(sys.argv[1], "the gallery", timeout=None):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_held_lock_makes_the_next_writer_wait_then_say_busy_and_dies_with_its_holder(tmp_path):
    from siamkit.fileio import Busy, file_lock

    lock = tmp_path / ".gallery.npz.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(Busy, match=r"^the gallery is busy: another process is writing it; run the command again "
                                       r"when it is done$"):
            with file_lock(lock, "the gallery", timeout=0):
                pass
        # A bounded wait ends in the same kind of line (the holder waits for its stdin, so it cannot let go).
        with pytest.raises(Busy, match=r"has been writing it for over 0.2 s"):
            with file_lock(lock, "the gallery", timeout=0.2):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the flock
        holder.wait(timeout=60)
    with file_lock(lock, "the gallery", timeout=0):
        pass


def test_a_zip_with_flipped_bytes_is_refused_naming_the_file(tmp_path):
    import zipfile

    from siamkit.fileio import check_zip

    path = tmp_path / "g.npz"
    with zipfile.ZipFile(path, "w") as z:  # stored, as torch.save and np.savez write their members
        z.writestr("embeddings.npy", bytes(range(256)) * 64)
    check_zip(path, "enroll it again")  # intact: no error
    data = bytearray(path.read_bytes())
    data[2000:2064] = bytes(b ^ 0xFF for b in data[2000:2064])
    path.write_bytes(bytes(data))
    with pytest.raises(SiamkitError, match=rf"^{path} is damaged: its part 'embeddings.npy' fails the zip's "
                                           rf"checksum or header check .*; enroll it again$"):
        check_zip(path, "enroll it again")
