"""Atomic file writes: a reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SiamkitError, info


# How long a writer of a shared file (a gallery, a calibration) waits for another one before it says "busy".
LOCK_TIMEOUT_S = 120.0


class WriteError(SiamkitError, OSError):
    """A file could not be written (full disk, no permission, path under a file).

    Also an OSError, so code that handles OSError keeps working; the CLI prints it as one error line.
    """


def write_error(path: str | os.PathLike, error: OSError, hint: str = "") -> WriteError:
    """One clear line for a failed write: which file, why, and what to do."""
    path = Path(path)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = f"the disk holding {path.parent} is full", "free some space there"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, fix = f"{path.parent} is not writable ({error.strerror})", "pick a writable folder"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST) and _file_above(path) is not None:
        why, fix = f"{_file_above(path)} is a file, not a folder", "pick another path"
    else:
        why, fix = error.strerror or type(error).__name__, "check the path and the disk"
    return WriteError(f"could not write {path}: {why}; {hint + '; ' if hint else ''}{fix} and run the command again")


def _file_above(path: Path) -> Path | None:
    """The first of ``path``'s folders that exists as something other than a folder, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def atomic_write(
    path: str | os.PathLike, write: Callable[[io.BufferedWriter], None], hint: str = ""
) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, fsync it, then rename it over ``path``.

    Rename within one folder is atomic on POSIX, so ``path`` holds either the old or the new content.
    An OSError (e.g. a full disk) becomes a WriteError naming the file; ``hint`` is added to its message.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give it the mode a plain open() would.
            os.fchmod(f.fileno(), _default_mode(path))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e, hint) from e
        raise
    # fsync the folder so that the rename itself survives a power cut.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read_umask() -> int:
    # os.umask can only be read by setting it; do that once, at import, before any writer threads exist.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _default_mode(path: Path) -> int:
    """The replaced file's mode, or 0666 minus the umask for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes (hex), read in chunks: what a stored hash of the file is compared with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_zip(path: Path, fix: str) -> None:
    """Refuse a zip file (a checkpoint, a gallery) whose stored CRC-32 checksums do not match its contents.

    torch checkpoints and .npz galleries are zip files: every member carries the CRC-32 of its bytes, so flipped
    bytes anywhere in the data are found before anything is used. A file that is not a zip at all is left to the
    reader's own error.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        if zipfile.is_zipfile(path):
            raise SiamkitError(f"{path} is damaged (its zip structure is broken); {fix}") from None
        return
    except Exception as e:  # zlib errors of a damaged compressed member
        raise SiamkitError(f"{path} is damaged ({type(e).__name__} while checking it); {fix}") from None
    if bad is not None:
        raise SiamkitError(f"{path} is damaged: its part {bad!r} fails the zip's checksum or header check (a disk "
                           f"or copy error changed it); {fix}")


class Busy(SiamkitError):
    """Another process holds the lock of a file this one wants to change."""


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def file_lock(lock: str | os.PathLike, what: str, timeout: float | None = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on the file ``lock`` (created if missing) while the block runs.

    flock, not a lock file that exists or not: the kernel releases it when the holder dies, so a killed writer never
    leaves a stale lock. ``what`` names the shared thing in messages. Another holder is waited for, with one line
    saying so, for at most ``timeout`` seconds (None: as long as it takes; 0: not at all), then Busy is raised.
    """
    lock = Path(lock)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(lock, e, f"the lock file of {what} must be writable") from e
    try:
        _acquire(fd, what, timeout)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(fd: int, what: str, timeout: float | None) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if timeout == 0:
            raise Busy(f"{what} is busy: another process is writing it; run the command again when it is done") from None
    info(f"waiting for another process that is writing {what}")
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue
    raise Busy(f"{what} is busy: another process has been writing it for over {timeout:g} s; run the command "
               f"again when it is done")
