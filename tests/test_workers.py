"""Several workers on one study: exactly the trials asked for, no lock errors."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from skiptune_search.core.limits import usable_cores
from skiptune_search.search.workers import split

EXE = str(Path(sys.executable).parent / "skiptune-search")


def test_split_is_even():
    assert split(10, 4) == [3, 3, 2, 2] and sum(split(7, 3)) == 7 and split(0, 2) == [0, 0]


# --optimizer tpe: what this checks holds for any optimizer, and TPE spares every process (workers
# included) the import of scipy.stats that CMA-ES, the linear family's default, brings in
def _run_workers(model_dir, tmp_path, workers, trials):
    cmd = [EXE, "search", "--model", str(model_dir), "--nfe", "1", "--n", "4", "--rungs", "4", "--batch", "4",
           "--workers", str(workers), "--trials", str(trials), "--optimizer", "tpe"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "locked" not in output.lower() and "Traceback" not in output
    url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials and len(states) == trials
    assert sum(t.user_attrs.get("baseline", False) for t in study.trials) == 1
    return result


def test_two_workers_share_one_study(tiny_model_dir, tmp_path):
    result = _run_workers(tiny_model_dir, tmp_path, workers=2, trials=6)
    assert "2 workers: 3, 3 trials" in result.stdout


@pytest.mark.slow
def test_four_workers_times_25_trials(tiny_model_dir, tmp_path):
    _run_workers(tiny_model_dir, tmp_path, workers=min(4, usable_cores()), trials=100)  # one per core at most


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql binaries)."""
    import glob
    import os
    import shutil
    import socket
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL binaries absent: apt-get install postgresql (.ci/run installs it)")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="skiptune-pg-"))  # under /tmp: the postgres user can reach it
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the package's postgres user
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=50"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                    str(root / "log"), "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_four_workers_on_postgresql(tiny_model_dir, tmp_path, postgres_url):
    workers = min(4, usable_cores())  # one per core at most (two on a two-core machine)
    cmd = [EXE, "search", "--model", str(tiny_model_dir), "--nfe", "1", "--n", "4", "--rungs", "4", "--batch", "4",
           "--workers", str(workers), "--trials", "20", "--storage", postgres_url, "--optimizer", "tpe"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name=optuna.get_all_study_names(postgres_url)[0], storage=postgres_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 20
    assert f"{workers} workers: {', '.join(map(str, split(20, workers)))} trials" in result.stdout


def test_each_worker_gets_its_own_gpu(monkeypatch):
    """With GPUs visible, the caller keeps the first (its cuda:0) and worker i gets GPU i, in the
    order the search command calls them: its own set-up first, then the start. What to load, then
    the job (storage URL and password included) go through the worker's stdin, never its command
    line."""
    import io
    import json
    import os

    import torch

    import skiptune_search.search.workers as W

    started = []

    class FakePopen:
        def __init__(self, argv, env, stdin):
            self.stdin = io.BytesIO()
            started.append((argv, env, self))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(W.subprocess, "Popen", FakePopen)
    W.own_setup(3)
    children = W.start(3, {"task": "T"})
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env, _ in started] == ["5", "7"]
    assert W.assign(children, [4, 4, 3], {"storage": "postgresql://alice:PW@db/x"}) == children
    lines = [child.stdin.getvalue().decode().splitlines() for _, _, child in started]
    assert [[json.loads(line) for line in two] for two in lines] == [
        [{"task": "T"}, {"storage": "postgresql://alice:PW@db/x", "share": share}] for share in (4, 3)]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5,7"
    # the library's worker through this interpreter, nothing imported from the working folder
    assert started[0][0] == [sys.executable, "-P", "-c", W.WORKER_CODE]
    assert not any("PW" in " ".join(argv) for argv, _, _ in started)


def test_workers_start_before_the_study_and_one_without_trials_is_stopped(monkeypatch, tmp_path):
    """The workers get what to load at their start, the job only once ``assign`` has their shares; a
    worker left without trials is stopped and not counted as failed."""
    import json

    import skiptune_search.search.workers as W

    monkeypatch.setattr(W, "WORKER_CODE", "import os, sys, time\n"  # writes its stdin to a file, line by line
                        f"with open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w') as f:\n"
                        "    for line in sys.stdin: f.write(line); f.flush()")
    monkeypatch.setattr(W, "visible_gpus", lambda: [])
    children = W.start(3, {"task": "T"})
    running = W.assign(children, [2, 0, 1], {"storage": "s"})
    assert running == [children[1]] and children[0].returncode is not None  # stopped, not waited for again
    running[0].stdin.close()  # this one ends at the end of its input
    assert W.wait(running) == 0
    lines = [json.loads(line) for line in (tmp_path / str(children[1].pid)).read_text().splitlines()]
    assert lines == [{"task": "T"}, {"storage": "s", "share": 1}]
    stopped = tmp_path / str(children[0].pid)  # perhaps stopped before it could open its file
    assert "share" not in (stopped.read_text() if stopped.exists() else "")


def test_the_workers_load_while_the_search_loads_its_own_model(run, tiny_model_dir, monkeypatch):
    """``search --workers`` starts its workers before it loads its model (they load theirs meanwhile)
    and gives them their shares once its study is open."""
    import skiptune_search.search.workers as W
    from skiptune_search.core.errors import StudyError
    from skiptune_search.scoring import evaluator

    order = []
    real_init = evaluator.Evaluator.__init__
    monkeypatch.setattr(evaluator.Evaluator, "__init__",
                        lambda self, *a, **k: (order.append("load"), real_init(self, *a, **k))[1])
    monkeypatch.setattr(W, "usable_cores", lambda: 2)
    monkeypatch.setattr(W, "start", lambda workers, first: order.append(("start", workers, first["task"]["nfe"])) or [])

    def assign(children, shares, second):
        order.append(("assign", shares, second["trials"]))
        raise StudyError("no trials here")  # what follows is the search's, as without workers

    monkeypatch.setattr(W, "assign", assign)
    result = run("search", "--model", tiny_model_dir, "--nfe", 1, "--n", 4, "--rungs", 4, "--batch", 4,
                 "--workers", 2, "--trials", 4, "--optimizer", "tpe")
    assert result.exit_code == 2 and "no trials here" in result.output, result.output
    assert order == [("start", 2, 1), "load", ("assign", [2, 2], 4)]


@pytest.mark.parametrize("loads, second", [(True, b""), (True, b'{"share": 2}\n'), (False, b""),
                                           (False, b'{"share": 2}\n')])
def test_a_worker_runs_only_once_given_its_share(monkeypatch, capsys, loads, second):
    """Closed before its second line (the parent failed or ended), a worker ends quietly, exit 0,
    even if its own load failed; given its share, it runs, or says why it cannot (exit 2)."""
    from skiptune_search.core.errors import ModelLoadError
    from skiptune_search.search import interrupts, worker

    class Lines:
        def __init__(self, fd):
            self.left = [b'{"task": "T"}\n', second]

        def next(self):
            return self.left.pop(0)

    def load(first):
        if not loads:
            raise ModelLoadError("no model here")
        return ("evaluator", first)

    ran = []
    monkeypatch.setattr(worker, "_Lines", Lines)
    monkeypatch.setattr(worker, "load", load)
    monkeypatch.setattr(worker, "run", lambda evaluator, work: ran.append((evaluator, work)))
    monkeypatch.setattr(worker, "_stop_when_parent_ends", lambda: None)  # would end this process with the pipe
    monkeypatch.setattr(interrupts, "install", lambda: None)
    if loads or not second:
        worker.main()  # returns: exit 0
    else:
        with pytest.raises(SystemExit) as stopped:
            worker.main()
        assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert ran == ([(("evaluator", {"task": "T"}), {"share": 2})] if loads and second else [])
    assert err == ("" if loads or not second else f"Error: worker {__import__('os').getpid()}: no model here\n")


def test_a_workers_lines_are_split_whatever_the_reads_bring():
    import os

    from skiptune_search.search.worker import _Lines

    read, write = os.pipe()
    os.write(write, b'{"a": 1}\n{"b": 2}\n{"c"')
    os.close(write)
    lines = _Lines(read)
    assert [lines.next() for _ in range(3)] == [b'{"a": 1}\n', b'{"b": 2}\n', b""]
    os.close(read)


def test_a_storage_password_is_never_shown_or_stored(run, tmp_path, tiny_model_dir, postgres_url, monkeypatch):
    """Issue 29, class 2: errors, the search's banner and summary, the exported schedule, the report,
    `studies` and the dashboard show a storage URL's password masked; workers get no URL on their
    command line (test_each_worker_gets_its_own_gpu, test_hostile_processes)."""
    import json
    import socket

    from cli_helpers import one_line_error

    secret = "S3cretPW"
    url = postgres_url.replace("postgres@", f"postgres:{secret}@", 1)  # the test server trusts any password
    shown = postgres_url.replace("postgres@", "postgres:***@", 1)
    for bad in (f"postgresql://alice:{secret}@127.0.0.1:1/db", f"postgresql://alice@127.0.0.1:1/db?password={secret}"):
        for args in (["studies", "--storage", bad], ["search", "--model", tiny_model_dir, "--storage", bad]):
            result = run(*args)
            one_line_error(result, "--storage: cannot open storage postgresql://alice", "***")
            assert secret not in result.output
    search = run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 4, "--rungs", 4, "--batch", 4,
                 "--trials", 2, "--storage", url, "--study", "secret", "--out", "best.json")
    assert search.exit_code == 0, search.output
    assert f"study 'secret' in {shown}:" in search.output and f"study storage:        {shown}" in search.output
    monkeypatch.setattr("optuna_dashboard.run_server", lambda *args, **kwargs: None)  # announce, then return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outputs = [search.output]
    for args in (["studies"], ["export", "--study", "secret", "-o", "b.json"],
                 ["report", "--study", "secret", "--samples", 0, "-o", "r.html"], ["dashboard", "--port", port]):
        result = run(*args, "--storage", url)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert f"optuna-dashboard on {shown} " in outputs[-1]
    assert json.loads((tmp_path / "b.json").read_text())["source"]["storage"] == shown
    written = [(tmp_path / name).read_text() for name in ("best.json", "b.json", "r.html")]
    assert shown in written[2] and not any(secret in text for text in outputs + written)
