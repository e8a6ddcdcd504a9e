"""Study storage: any SQLAlchemy URL (SQLite with a busy timeout and WAL, PostgreSQL, MySQL), with
heartbeats that retry a dead worker's trial, and where trial artifacts (sample grids) go."""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy

from ..core.errors import StorageError

SQLITE_BUSY_TIMEOUT = 60.0  # seconds a worker waits for another's write lock before giving up


def make_storage(url: str, heartbeat: int | None = 60, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for a SQLAlchemy URL; SQLite folders are created, with a busy timeout.
    With ``create`` False (commands that only read) a missing SQLite file is an error, not a new
    empty database.

    With ``heartbeat`` (seconds), a running trial beats; one whose worker died (killed, machine
    lost) is marked failed after two missed beats by the next worker that starts, and retried
    with the same parameters (up to 3 times). Completed trials are never touched. Optuna's own
    log is set to warnings only."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created or loaded
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not create and str(path) != ":memory:" and not path.is_file():
            raise StorageError(f"no study storage at {path}; run a search first, or give the storage it used",
                               option="storage")
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
        if str(path) != ":memory:":  # write-ahead log: readers never block the writer (persists in the file)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)) as db:
                    db.execute("PRAGMA journal_mode=WAL")
            except (OSError, sqlite3.Error) as exc:
                raise StorageError(f"cannot open storage {url} ({exc}); check that the folder exists and is "
                                   f"writable, or use another storage", option="storage") from None
    try:
        return _rdb_storage(url, heartbeat, kwargs)
    except ImportError as exc:  # the database's driver (psycopg for PostgreSQL) is an extra
        raise StorageError(f"storage {url} needs the package {exc.name}: pip install 'skiptune-search[postgres]' "
                           f"(PostgreSQL), or the SQLAlchemy driver of your database", option="storage") from None
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise StorageError(f"cannot open storage {url} ({reason}); check that the path or server exists, "
                           f"is reachable and is writable", option="storage") from None


def storage_faults(fn):
    """Turn a storage that fails under a command (a damaged SQLite file, a full disk, a database
    gone read-only or away) into a one-line StorageError. Finished trials are kept: each one was
    committed when it ended."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except sqlalchemy.exc.DatabaseError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            raise StorageError(f"the study storage failed ({reason}); if it is a damaged file, restore a copy or "
                               f"use another storage; a full disk: free space and run the command again",
                               option="storage") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StorageError(f"the disk is full ({exc.filename or 'writing'}); free space and run the same "
                               f"command again: every finished trial is kept") from None

    return wrapper


def retry_from_first_rung(retry: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]):
    """Optuna's retry of a dead worker's trial, minus the successive-halving rungs it passed: the
    retry copies the trial's system attributes, and with them it would skip the first rung's check."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("completed_rung_")}
        retry(study, trial)

    return callback


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
                return optuna.storages.RDBStorage(url, **kwargs)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
                # two processes creating a new database at once: the second finds the first's tables
                # (or schema version row) half made; once the first is done, opening it again works
                if not ("already exists" in str(exc) or "alembic_version" in str(exc)) or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))


def artifact_dir(storage_url: str) -> Path:
    """Where trial artifacts (sample grids) go: beside a SQLite file, else studies/artifacts."""
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        return Path(storage_url[len("sqlite:///"):]).parent / "artifacts"
    return Path("studies") / "artifacts"
