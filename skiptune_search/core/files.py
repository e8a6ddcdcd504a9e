"""Atomic file writes: a temp file beside the target, renamed over it only when complete, so a
crash or a full disk never leaves a half-written schedule, report, grid or statistics file; and
the check that an output path is a regular file, not a link, folder or device."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputPathError, SkiptuneError

# what a full, read-only or forbidden file system answers a write with
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` if a regular file may be written there: nothing is there yet, or a regular file
    (replaced whole). A symbolic link, folder, FIFO, socket or device there is refused, so an
    output never follows a link elsewhere or writes into a device."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:  # a parent that is a file, a name too long, a loop of links
        raise OutputPathError(f"cannot write {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise OutputPathError(f"{path} is {kind}; outputs are written only as regular files: pass another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it replaces ``path``, else it is removed,
    so a crash or a full disk never leaves a half-written file. ``path`` must be a regular file or
    nothing (``check_output_path``); a folder that cannot be made or written, or a full disk, is
    an ``OutputPathError``."""
    path = check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            with open(tmp, "rb") as f:  # on disk before the rename: a power loss leaves the old file, not an empty one
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRORS:
                raise
            raise OutputPathError(f"cannot write {path}: {exc.strerror}; nothing was written") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock file for the block, or fail at once when another process holds it:
    two runs writing the same results files would interleave their trials. Released by the OS
    when the process ends, even killed. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SkiptuneError(f"{folder} is in use by {holder}; wait for it to end, or use another folder",
                                option="work") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
