"""Hostile input, round 3 (issue 29): no code imported from the working folder or unpickled on a
file's word (class 3), workers that stop with their parent and no in-memory storage (class 4),
every storage and file-system fault one line with nothing left RUNNING (class 7). Class 2 (no
password shown or stored) is in test_workers.py, beside its PostgreSQL server."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from cli_helpers import ends_in_one_line_error, one_line_error

EXE = str(Path(sys.executable).parent / "skiptune-search")


# --optimizer tpe: what this checks holds for any optimizer, and TPE spares every process (workers
# included) the import of scipy.stats that CMA-ES, the linear family's default, brings in
def tiny_search(model_dir, *extra):
    return ["search", "--model", model_dir, "--nfe", 3, "--n", 4, "--rungs", 4, "--batch", 4, "--optimizer", "tpe",
            *extra]


def _rows(db: Path) -> list:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT trial_id, number, state FROM trials ORDER BY trial_id").fetchall()


class _Planted:
    """A pickle that leaves a mark when it is loaded (what a hostile model file would do)."""

    def __init__(self, mark: Path):
        self.mark = str(mark)

    def __reduce__(self):
        return (open, (self.mark, "w"))


# --- class 3: trust stays with the command line ------------------------------------------------------
def test_trust_covers_only_a_model_named_on_the_command_line(run, tmp_path, tiny_model_dir):
    from skiptune_search.core.schedule import RhoSchedule, SkipInfo

    mark, net = tmp_path / "UNPICKLED", tmp_path / "net.pkl"
    net.write_bytes(pickle.dumps(_Planted(mark)))
    skips = [SkipInfo(name="conv_in", consumer="up_blocks.2.resnets.2", channels=16, resolution=28)]
    RhoSchedule.constant("UNet2DModel", skips, [1.0], tuned_for={"model": str(net), "sampler": "heun", "nfe": 3}
                         ).save(tmp_path / "s.json")
    before = (tmp_path / "s.json").read_bytes()
    for args in (["sample", "--schedule", "s.json", "--trust-pickle", "-o", "g.png"],
                 ["evaluate", "--schedule", "s.json", "--trust-pickle", "--n", 4, "--blocks", 2]):
        result = run(*args)
        one_line_error(result, "--trust-pickle: the model", "named by the schedule file", f"pass --model {net}")
    # a study's stored model is a file's word too
    assert run(*tiny_search(tiny_model_dir, "--trials", 1)).exit_code == 0
    one_line_error(run("report", "--study", "tiny-model-heun-nfe3-linear-input", "--trust-pickle", "-o", "r.html"),
                   "--trust-pickle: the model", "named by the study", "pass --model")
    assert not mark.exists() and not (tmp_path / "g.png").exists() and not (tmp_path / "r.html").exists()
    assert (tmp_path / "s.json").read_bytes() == before


# --- class 4 (and 3, 2): workers -------------------------------------------------------------------
def _worker_pids(db: Path, parent: int) -> set[int]:
    """The processes other than the parent that ran trials of the study so far."""
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db, timeout=30) as con:
            rows = con.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'worker'").fetchall()
    except sqlite3.OperationalError:  # the tables are not made yet
        return set()
    return {json.loads(v)["pid"] for (v,) in rows} - {parent}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


def _start(cmd, cwd: Path, db: Path) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` (a search with two workers); once its worker runs a trial, the parent and the worker's pid."""
    known = _worker_pids(db, -1)
    parent = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (pids := _worker_pids(db, parent.pid) - known) and parent.poll() is None:
        assert time.monotonic() < deadline, "no worker ran a trial"
        time.sleep(0.3)
    assert parent.poll() is None, parent.communicate()
    (worker,) = pids
    return parent, worker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopping_the_parent_stops_its_workers(run, tmp_path, tiny_model_dir):
    for url in ("sqlite:///:memory:", "sqlite://"):  # its trials, and every worker's, would be lost
        one_line_error(run(*tiny_search(tiny_model_dir, "--storage", url, "--workers", 2)),
                       "--storage: ", "in-memory", "give a file")
    (tmp_path / "tqdm.py").write_text("open(__file__ + '.imported', 'w').close()\n")  # planted in the working folder
    db = tmp_path / "studies" / "w.db"
    cmd = [EXE, *map(str, tiny_search(tiny_model_dir, "--nfe", 1, "--workers", 2, "--trials", 60,
                                      "--storage", "sqlite:///studies/w.db"))]
    parent, worker = _start(cmd, tmp_path, db)
    assert b"sqlite" not in Path(f"/proc/{worker}/cmdline").read_bytes()  # the storage URL is on no command line
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 143 and err.strip().endswith("every finished trial is saved; rerun the same "
                                                             "command to resume"), err
    assert "Traceback" not in out + err and not _alive(worker)
    rows = _rows(db)
    assert rows and "RUNNING" not in {state for *_, state in rows}
    time.sleep(2)
    assert _rows(db) == rows  # nobody writes trials any more
    assert not (tmp_path / "tqdm.py.imported").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_parents_death_ends_its_workers(tmp_path, tiny_model_dir):
    """SIGKILL leaves the parent no chance to stop anyone: its end closes the worker's pipe."""
    db = tmp_path / "studies" / "w.db"
    cmd = [EXE, *map(str, tiny_search(tiny_model_dir, "--nfe", 1, "--workers", 2, "--trials", 60,
                                      "--storage", "sqlite:///studies/w.db"))]
    parent, worker = _start(cmd, tmp_path, db)
    parent.kill()
    parent.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.3)
    with sqlite3.connect(db) as con:
        left = con.execute("SELECT a.value_json FROM trials t JOIN trial_user_attributes a USING (trial_id) "
                           "WHERE t.state = 'RUNNING' AND a.key = 'worker'").fetchall()
    assert worker not in {json.loads(v)["pid"] for (v,) in left}  # its trial ended, failed: it runs again


# --- class 7: storage and file-system faults ---------------------------------------------------------
def test_storage_faults_are_one_line_and_leave_nothing_running(run, tmp_path, tiny_model_dir, monkeypatch):
    import sqlalchemy

    db = tmp_path / "studies" / "skiptune.db"
    long_name = "sqlite:///" + "d" * 300 + "/s.db"
    for url, says in ((long_name, "longer than the file system allows"),
                      ("sqlite:///q.db?mode=ro", "has a query string (mode), which is not applied"),
                      ("mysql://bob:PW@localhost/x", "needs its driver module 'MySQLdb'"),
                      ("nosuchdb://h/x", "SQLAlchemy knows no database 'nosuchdb'"),
                      ("sqlite:////dev/null", "/dev/null is not a database file")):
        one_line_error(run(*tiny_search(tiny_model_dir, "--storage", url)), "--storage: ", says)
    one_line_error(run("inspect", "--model", "d" * 300), "--model: ", "File name too long; give a shorter path")
    one_line_error(run("search", "--config", "d" * 300 + ".toml"), "--config: ", "give a shorter path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-model"]  # no 'q.db?mode=ro' file, no folder
    one_line_error(run("dashboard", "--host", ""), "--host: an empty host", "127.0.0.1")

    # the disk fills when a trial's end is written: one line, no trial left RUNNING, the run resumes
    from skiptune_search.search import storage as S

    storage_cls = type(S.make_storage(f"sqlite:///{tmp_path}/probe.db", heartbeat=None))  # the class a search uses
    real, calls = storage_cls.set_trial_state_values, []

    def disk_fills(self, trial_id, state, values=None):
        calls.append(state)
        if state == optuna.trial.TrialState.COMPLETE and len(calls) > 2:  # the second trial's end
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, sqlite3.OperationalError("database or disk is full"))
        return real(self, trial_id, state, values)

    with monkeypatch.context() as m:
        m.setattr(storage_cls, "set_trial_state_values", disk_fills)
        result = run(*tiny_search(tiny_model_dir, "--trials", 3))
    ends_in_one_line_error(result, "--storage: the study storage failed (database or disk is full)", "free space")
    rows = _rows(db)
    assert [state for *_, state in rows] == ["COMPLETE", "FAIL", "WAITING"]  # the failed trial is queued again

    # a database of an Optuna schema this version does not know: one line, the file untouched
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (version,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
        con.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    before = db.read_bytes()
    for args in (["studies"], tiny_search(tiny_model_dir, "--trials", 3)):
        one_line_error(run(*args), "--storage: storage sqlite:///studies/skiptune.db was written by another Optuna",
                       "use the Optuna version that wrote it")
    assert db.read_bytes() == before
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (version,))
    assert run(*tiny_search(tiny_model_dir, "--trials", 3)).exit_code == 0
    assert [state for *_, state in _rows(db)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
