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
from typing import Any, BinaryIO, Iterable, Iterator

from .errors import InputFileError, OutputPathError, SkiptuneError

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
    lock = folder / ".lock"
    try:  # never through a link planted there (it is truncated below), never a FIFO (no hang)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        raise OutputPathError(f"cannot use the lock file {lock} ({exc.strerror}); remove it if it is a link",
                              option="work") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputPathError(f"{lock} is not a regular file; remove it", option="work")
    os.set_blocking(fd, True)
    with open(fd, "a+") as handle:
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


# --- outputs that must not be the run's own files -------------------------------------------------
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")  # a SQLite database and the files SQLite keeps beside it


def sqlite_files(storage_url: str | None) -> list[Path]:
    """The files of a ``sqlite:///`` storage URL (the database, its WAL, shared memory and
    journal); none for other databases or an in-memory one."""
    if not storage_url or not storage_url.startswith("sqlite:///"):
        return []
    name = storage_url[len("sqlite:///"):].split("?", 1)[0]
    if not name or name == ":memory:":
        return []
    return [Path(name + suffix) for suffix in SQLITE_COMPANIONS]


def _real(path: str | os.PathLike) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a loop of links, a NUL in the name: compared as written
        return os.path.abspath(path)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same file on disk (a hard link or a link to it included)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


MODEL_MARKERS = ("skiptune_model.json", "model_index.json")  # a model folder of this tool, a diffusers pipeline


def _kept_by_the_tool(out: Path) -> str | None:
    """What ``out`` is when it is a file this tool keeps whatever the command: a SQLite database
    (a study storage, any run's), or a file of a model folder or pipeline; None otherwise."""
    try:
        with open(out, "rb") as f:  # a regular file (check_output_path): no hang
            if f.read(16) == b"SQLite format 3\x00":
                return "a SQLite database (a study storage)"
    except OSError:
        pass
    for folder in (out.parent, out.parent.parent):
        if any((folder / marker).is_file() for marker in MODEL_MARKERS):
            return f"inside the model folder {folder}"
    return None


def check_output(path: str | os.PathLike, inputs: "Iterable[tuple[str, str | os.PathLike | None]]" = (),
                 storage: str | None = None, option: str | None = "out") -> Path:
    """``path`` if a command may write it: a regular file or nothing (``check_output_path``: no
    link, folder, FIFO or device), and none of the run's own files: not the study storage (nor
    SQLite's -wal, -shm, -journal beside it), not a file the run reads nor anything inside a
    folder it reads (``inputs``: (what, path) pairs, e.g. ("the model folder", "M"); the bundled
    model and reference too, where the run reads them). Called by every command for each output before any work
    starts; refuses in one line naming what the path is and the fix."""
    out = Path(path)
    try:
        check_output_path(out)
    except OutputPathError as exc:
        raise OutputPathError(str(exc), option=option) from None
    real = _real(out)
    protected: list[tuple[str, str | os.PathLike]] = [("the study storage", p) for p in sqlite_files(storage)]
    protected += [(what, p) for what, p in inputs if p is not None and str(p) != ""]
    kept = _kept_by_the_tool(out)
    if kept:
        raise OutputPathError(f"{out} is {kept}; writing there would overwrite or change it: pass another output path",
                              option=option)
    for what, p in protected:
        other = _real(p)
        # under it, whether it is a folder already or not yet made (a --work folder the run will fill)
        inside = (real + os.sep).startswith(other.rstrip(os.sep) + os.sep)
        if real == other or inside or _same_file(out, p):
            where = "inside " if inside and real != other else ""
            raise OutputPathError(f"{out} is {where}{what} ({p}), which this command reads or keeps; writing there "
                                  f"would overwrite or change it: pass another output path", option=option)
    return out


# --- inputs: bounded and typed before use ---------------------------------------------------------
MAX_TEXT_BYTES = 16 << 20  # a schedule, config, prompt file or model record: far below this
MAX_JSON_DEPTH = 32  # every file this tool writes nests at most 4 deep


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


# what to do when a file cannot be opened for reading, by errno
_READ_FIXES = {errno.ENAMETOOLONG: "give a shorter path", errno.ELOOP: "give the real path, not a loop of links",
               errno.EACCES: "make it readable", errno.EPERM: "make it readable"}


def open_input(path: str | os.PathLike, what: str, max_bytes: int | None = MAX_TEXT_BYTES,
               error: type[SkiptuneError] = InputFileError, option: str | None = None) -> BinaryIO:
    """``path`` opened for reading in binary, once it is known to be a regular file of at most
    ``max_bytes``: a FIFO, device, socket or folder is refused in one line (opened without
    blocking, so a FIFO with no writer cannot hang), and so is a file over the cap. ``what``
    names the file in messages ("schedule file"); errors are ``error`` with ``option``."""
    shown = str(path)[:200]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(f"{what} {shown} not found; check the path", option=option) from None
    except IsADirectoryError:
        raise error(f"{what} {shown} is a folder; pass a file", option=option) from None
    except (OSError, ValueError) as exc:  # no permission, a loop of links, a name too long, a NUL
        fix = _READ_FIXES.get(getattr(exc, "errno", None), "check the path")
        raise error(f"cannot read {what} {shown}: {getattr(exc, 'strerror', None) or exc}; {fix}",
                    option=option) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {shown} is {_kind(info.st_mode)}, not a regular file; pass a file", option=option)
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{what} {shown} is {info.st_size:,} bytes, over the {max_bytes:,} this tool reads; pass the "
                        f"right file", option=option)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_input_file(path: str | os.PathLike, what: str, max_bytes: int | None = None,
                     error: type[SkiptuneError] = InputFileError, option: str | None = None) -> Path:
    """``path`` once it is a regular file of at most ``max_bytes`` (as ``open_input``), for a
    library that opens it by name (torch, diffusers, PIL)."""
    open_input(path, what, max_bytes, error, option).close()
    return Path(path)


def read_bounded_bytes(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES,
                       error: type[SkiptuneError] = InputFileError, option: str | None = None) -> bytes:
    with open_input(path, what, max_bytes, error, option) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"cannot read {what} {str(path)[:200]}: {exc.strerror or exc}", option=option) from None
    if len(data) > max_bytes:  # grew while read
        raise error(f"{what} {str(path)[:200]} is over the {max_bytes:,} bytes this tool reads; pass the right file",
                    option=option)
    return data


def read_bounded_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES,
                      error: type[SkiptuneError] = InputFileError, option: str | None = None) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes`` (a BOM is dropped)."""
    data = read_bounded_bytes(path, what, max_bytes, error, option)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(path)[:200]} is not UTF-8 text (byte {exc.start}); save it as UTF-8",
                    option=option) from None


def _no_duplicates(where: str, error: type[SkiptuneError], option: str | None):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {key!r} appears twice in one object; keep one", option=option)
            out[key] = value
        return out
    return hook


def _depth(value: Any) -> int:
    """How deep the lists and dicts of a parsed JSON or TOML value nest (walked without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str, where: str, max_depth: int = MAX_JSON_DEPTH,
               error: type[SkiptuneError] = InputFileError, option: str | None = None) -> Any:
    """A JSON text parsed strictly: at most ``max_depth`` levels of nesting, no key twice in one
    object, no NaN or Infinity (not JSON)."""
    import json

    def constant(name: str):
        raise error(f"{where}: holds {name}, which is not a JSON number; write a finite number", option=option)

    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(where, error, option), parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})", option=option) from None
    except RecursionError:
        data = None
    if data is None and text.strip() != "null" or _depth(data) > max_depth:
        raise error(f"{where}: nested more than {max_depth} levels deep; this is not a file of this tool",
                    option=option)
    return data


def read_json(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_JSON_DEPTH,
              error: type[SkiptuneError] = InputFileError, option: str | None = None) -> Any:
    """A JSON file read bounded (``read_bounded_text``) and parsed strictly (``parse_json``)."""
    text = read_bounded_text(path, what, max_bytes, error, option)
    return parse_json(text, f"{what} {str(path)[:200]}", max_depth, error, option)


def read_toml(path: str | os.PathLike, what: str, max_bytes: int = 1 << 20,
              error: type[SkiptuneError] = InputFileError, option: str | None = None) -> dict:
    """A TOML file read bounded; TOML itself refuses a key given twice."""
    import tomllib

    text = read_bounded_text(path, what, max_bytes, error, option)
    where = f"{what} {str(path)[:200]}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{where} is not valid TOML: {exc}", option=option) from None
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_JSON_DEPTH:
        raise error(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; this is not a config file",
                    option=option)
    return data
