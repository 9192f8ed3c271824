"""Atomic file writes: a reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import SiamkitError


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
