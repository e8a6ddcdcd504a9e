"""Study storage: any SQLAlchemy URL (SQLite with a busy timeout and WAL, PostgreSQL, MySQL), with
heartbeats that retry a dead worker's trial, and where trial artifacts (sample grids) go."""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import os
import re
import sqlite3
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy

from ..core.errors import StorageError

SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "sslpassword")  # a URL's query keys that hold a password
SQLITE_BUSY_TIMEOUT = 60.0  # seconds a worker waits for another's write lock before giving up


def shown_url(url: str) -> str:
    """``url`` as the tool shows and stores it (messages, banners, exported schedules, reports):
    its password masked, as SQLAlchemy renders it (``postgresql://alice:***@host/db``), a
    ``password=`` in its query string too. Every place that prints or writes a storage URL goes
    through here."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        # not a URL SQLAlchemy reads: mask anything between '://user:' and '@' all the same
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", str(url))
    secret_keys = [k for k in parsed.query if k.lower() in SECRET_QUERY_KEYS]
    shown = parsed.render_as_string(hide_password=True) if parsed.password is not None else url
    head, mark, query = url.partition("?")
    if head.count("@") > 1:  # an '@' left unencoded in the password: SQLAlchemy would show its end as the host
        shown = re.sub(r"^([^:/]+://[^:/@]*:).*@", r"\1***@", head) + mark + query
    for key in secret_keys:
        shown = re.sub(rf"([?&]{re.escape(key)}=)[^&]*", r"\1***", shown)
    return shown


def _masked(text: str, url: str) -> str:
    """``text`` (a driver's message) with the URL, and its password, masked."""
    text = text.replace(url, shown_url(url))
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        return text
    secrets = [parsed.password, *(v for k, v in parsed.query.items() if k.lower() in SECRET_QUERY_KEYS)]
    for secret in secrets:
        if isinstance(secret, str) and len(secret) >= 4:  # shorter: it would mask words of the message
            text = text.replace(secret, "***")
    return text


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, else None (a server's URL, or one SQLAlchemy cannot read)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def check_storage_url(url: str) -> None:
    """Refuse what cannot hold a study past the command: an in-memory SQLite database (its trials,
    and every worker's, are gone when the command ends), and a SQLite URL with a query string
    (its options are not applied: ``sqlite:///q.db?mode=ro`` would name a file ``q.db?mode=ro``)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        raise StorageError(f"{shown_url(url)!r} is not a database URL: give sqlite:///path/to/file.db, or "
                           f"postgresql://user@host/db (any SQLAlchemy URL)", option="storage") from None
    if parsed.get_backend_name() != "sqlite":
        return
    if parsed.database in (None, "", ":memory:") or str(parsed.database).startswith("file::memory:"):
        raise StorageError(f"{shown_url(url)} is an in-memory database: its trials (and every worker's) are lost "
                           f"when the command ends; give a file, e.g. sqlite:///studies/skiptune.db",
                           option="storage")
    if parsed.query:
        raise StorageError(f"the SQLite URL {url} has a query string ({'&'.join(parsed.query)}), which is not "
                           f"applied; give the plain path, e.g. sqlite:///{parsed.database}", option="storage")


def make_storage(url: str, heartbeat: int | None = 60, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for a SQLAlchemy URL; SQLite folders are created, with a busy timeout.
    With ``create`` False (commands that only read) a missing SQLite file is an error, not a new
    empty database. In-memory SQLite and SQLite URLs with options are refused (``check_storage_url``).

    With ``heartbeat`` (seconds), a running trial beats; one whose worker died (killed, machine
    lost) is marked failed after two missed beats by the next worker that starts, and retried
    with the same parameters (up to 3 times). Completed trials are never touched. Optuna's own
    log is set to warnings only."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created or loaded
    check_storage_url(url)
    kwargs: dict = {}
    shown = shown_url(url)
    path = sqlite_file(url)
    if path is not None:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
        try:  # write-ahead log: readers never block the writer (persists in the file)
            if path.exists() and not path.is_file():
                raise StorageError(f"{path} is not a database file (a folder, device or pipe): give a file path, "
                                   f"e.g. sqlite:///{path / 'skiptune.db' if path.is_dir() else 'studies/skiptune.db'}",
                                   option="storage")
            if not create and not path.is_file():
                raise StorageError(f"no study storage at {path}; run a search first, or give the storage it used",
                                   option="storage")
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            fix = READ_ONLY_FIX if _read_only(path) else _fault_fix(exc)
            raise StorageError(f"cannot open storage {url} ({_fault_reason(exc)}); {fix}", option="storage") from None
    try:
        return _rdb_storage(url, heartbeat, kwargs)
    except ImportError as exc:  # the database's driver (psycopg for PostgreSQL) is an extra
        missing = getattr(exc.__cause__, "name", None) or exc.name
        driver = f"its driver module {missing!r}" if missing else "the SQLAlchemy driver its URL names"
        fix = ("pip install 'skiptune-search[postgres]'" if url.startswith("postgresql") else
               "install that driver, or name an installed one in the URL (e.g. mysql+pymysql://)")
        raise StorageError(f"storage {shown} needs {driver}, which is not installed: {fix}", option="storage") from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"storage {shown}: SQLAlchemy knows no database {url.split(':', 1)[0]!r}; give "
                           f"sqlite:///path/to/file.db, postgresql://... or mysql+pymysql://...",
                           option="storage") from None
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise StorageError(f"cannot open storage {shown} ({_masked(_fault_reason(exc), url)}); "
                           f"{_fault_fix(exc)}", option="storage") from None
    except RuntimeError as exc:  # Optuna's check of the tables' schema version
        if "schema" not in str(exc):
            raise
        raise StorageError(f"storage {shown} was written by another Optuna version ({_masked(str(exc), url)}"
                           f"); use the Optuna version that wrote it, or a new storage", option="storage") from None


READ_ONLY_FIX = ("the database file or its folder is read-only (SQLite writes a -wal and a -shm file beside the "
                 "database, even to read it): make both writable, or copy the file to a writable folder and give "
                 "that copy as the storage")


def _read_only(path: Path) -> bool:
    """A SQLite file, or the folder it is or would be in, that this process may not write."""
    try:
        if path.exists():
            return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
        return path.parent.exists() and not os.access(path.parent, os.W_OK)
    except OSError:
        return False


def _fault_reason(exc: BaseException) -> str:
    """The first line of a storage fault's own message (the driver's, not SQLAlchemy's wrapping)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # its file name is the storage's, named beside it
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _fault_fix(exc: BaseException) -> str:
    """What to do about a storage fault, by what it says."""
    reason = _fault_reason(exc).lower()
    errno_ = getattr(exc, "errno", None)
    if "locked" in reason or "busy" in reason:
        return (f"another process held the storage's write lock for more than {SQLITE_BUSY_TIMEOUT:g} s: let it "
                f"finish (or stop it), then run the command again")
    if "readonly" in reason or "read-only" in reason or errno_ in (errno.EROFS, errno.EACCES, errno.EPERM):
        return READ_ONLY_FIX
    if "disk is full" in reason or "disk full" in reason or errno_ in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space and run the command again (every finished trial is kept)"
    if errno_ == errno.ENAMETOOLONG or "name too long" in reason:
        return "the path is longer than the file system allows: give a shorter one"
    if "not a database" in reason or "malformed" in reason:
        return "the file is damaged or not a database: restore a copy, or give another storage"
    return "check that the path or server exists, is reachable and is writable"


def storage_fault(exc: BaseException) -> StorageError | None:
    """The one-line error for a storage that failed under a command (a damaged SQLite file, a full
    disk, a database gone read-only, locked or away), or None for anything else. Optuna, when the
    write that ends a trial fails, raises an AssertionError ("Should not reach.") over the real
    fault: that fault is what is judged."""
    if isinstance(exc, AssertionError) and exc.__context__ is not None:
        exc = exc.__context__
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__  # Optuna's wrapping of the database's own error
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the disk is full ({exc.filename or 'writing'}); free space and run the same "
                            f"command again: every finished trial is kept")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENAMETOOLONG):
        return StorageError(f"cannot write {exc.filename or 'the study storage'} ({exc.strerror}); "
                            f"{_fault_fix(exc)}", option="storage")
    if isinstance(exc, sqlalchemy.exc.DatabaseError):
        reason = _fault_reason(exc)
        fix = _fault_fix(exc)
        if fix.startswith("check that"):  # nothing more specific
            fix = ("if it is a damaged file, restore a copy or use another storage; a full disk: free space and run "
                   "the command again")
        return StorageError(f"the study storage failed ({reason}); {fix}", option="storage")
    return None


def storage_faults(fn):
    """Turn a storage that fails under a command into a one-line StorageError (``storage_fault``).
    Finished trials are kept: each one was committed when it ended."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (sqlalchemy.exc.DatabaseError, optuna.exceptions.StorageInternalError, OSError, AssertionError) as exc:
            error = storage_fault(exc)
            if error is None:
                raise
            raise error from None

    return wrapper


def retry_from_first_rung(retry: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]):
    """Optuna's retry of a dead worker's trial, minus the successive-halving rungs it passed: the
    retry copies the trial's system attributes, and with them it would skip the first rung's check."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("completed_rung_")}
        retry(study, trial)

    return callback


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, a queued (waiting) trial claimed by one conditional UPDATE. Optuna reads
    the trial's state and then writes it, locking the row on PostgreSQL and MySQL only: on SQLite two
    processes could both start one queued trial, and the second to end it failed ('Cannot tell a
    COMPLETE trial'). False, as Optuna's: the trial is no longer waiting."""

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState, values=None) -> bool:
        if state != optuna.trial.TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        with self.engine.begin() as connection:
            claimed = connection.execute(
                sqlalchemy.text("UPDATE trials SET state = 'RUNNING', datetime_start = :now "
                                "WHERE trial_id = :trial_id AND state = 'WAITING'"),
                {"now": datetime.now(), "trial_id": trial_id}).rowcount
        return claimed == 1


def _rdb_storage(url: str, heartbeat: int | None, kwargs: dict) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats and retries are 'experimental' in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = retry_from_first_rung(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            else:
                kwargs["failed_trial_callback"] = retry_from_first_rung(
                    optuna.storages.RetryFailedTrialCallback(max_retry=3))
            kwargs.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
        for attempt in range(5):
            try:
                return _Storage(url, **kwargs)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
                # two processes creating a new database at once: the second finds the first's tables
                # (or schema version row) half made; once the first is done, opening it again works
                if not ("already exists" in str(exc) or "alembic_version" in str(exc)) or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))


@contextlib.contextmanager
def borrowed_study(name: str, source: optuna.storages.BaseStorage, storage: optuna.storages.BaseStorage):
    """``source``'s study ``name`` copied into ``storage`` while the block runs, with its trials and
    user attributes (a study created in the block finds it among its ``study.siblings``), and
    deleted after it. A study of ``source`` already in ``storage`` is a copy a process killed
    inside such a block left: deleted first."""
    theirs = set(optuna.get_all_study_names(source))
    for left in optuna.get_all_study_names(storage):
        if left in theirs:
            optuna.delete_study(study_name=left, storage=storage)
    optuna.copy_study(from_study_name=name, from_storage=source, to_storage=storage)
    try:
        yield
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def run_files(storage_url: str | None) -> list[tuple[str, Path]]:
    """The search's own files, as (what, path) pairs for the output guard: the SQLite files of
    ``storage_url`` and of the default storage (the tool's own in any run), their artifacts."""
    from ..core.files import sqlite_files
    from . import DEFAULT_STORAGE

    files = []
    for url in dict.fromkeys((storage_url or DEFAULT_STORAGE, DEFAULT_STORAGE)):
        files += [("the study storage", p) for p in sqlite_files(url)] + [("the study artifacts", artifact_dir(url))]
    return files


def artifact_dir(storage_url: str) -> Path:
    """Where trial artifacts (sample grids) go: beside a SQLite file, else studies/artifacts."""
    path = sqlite_file(storage_url)
    return path.parent / "artifacts" if path is not None else Path("studies") / "artifacts"
