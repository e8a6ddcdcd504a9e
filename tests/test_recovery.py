"""A worker killed mid-trial, and Ctrl-C: nothing lost, nothing corrupted, the study goes on."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

EXE = str(Path(sys.executable).parent / "skiptune-search")
STATES = optuna.trial.TrialState


def _search(model_dir, *extra):
    # N = 400 samples at NFE 3 with batch 20: long enough per trial to be interrupted mid-way
    # (--optimizer tpe: the recovery is the same under any optimizer, and TPE spares each process
    # the import of scipy.stats that CMA-ES, the linear family's default, brings in)
    return [EXE, "search", "--model", str(model_dir), "--nfe", "3", "--n", "400", "--rungs", "400",
            "--batch", "20", "--threads", "1", "--optimizer", "tpe", *map(str, extra)]


def _wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _study(tmp_path):
    names = optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies/skiptune.db")
    return optuna.load_study(study_name=names[0], storage=f"sqlite:///{tmp_path}/studies/skiptune.db")


def _running_after_complete(tmp_path):
    # the study file is opened only once a trial has saved its sample grid: opening it earlier
    # could create its tables beside the worker, which is then the one that fails
    if not any((tmp_path / "studies" / "artifacts").glob("*")):
        return False
    try:
        trials = _study(tmp_path).trials
    except Exception:
        return False
    # and the running trial has all its parameters (the objective records its ρ once they are drawn):
    # killed before it asked for them, or between two, it has none or some to compare with its retry
    return (any(t.state == STATES.COMPLETE for t in trials) and trials[-1].state == STATES.RUNNING
            and "rho" in trials[-1].user_attrs)


def _wait_until_a_trial_runs_after_one_completed(worker, tmp_path):
    """Wait for the moment to interrupt the worker; if it never comes, fail with what the worker said."""
    if _wait_for(lambda: _running_after_complete(tmp_path) or worker.poll() is not None) and worker.poll() is None:
        return
    worker.kill()
    err = worker.communicate()[1] or ""
    raise AssertionError(f"no trial got under way (worker exit code {worker.returncode}): {err[-1500:]}")


def test_killed_worker_trial_is_marked_failed_and_retried(tiny_model_dir, tmp_path):
    worker = subprocess.Popen(_search(tiny_model_dir, "--trials", 5, "--heartbeat", 1), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_a_trial_runs_after_one_completed(worker, tmp_path)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        worker.kill()
    before = _study(tmp_path).trials
    killed = before[-1]
    assert killed.state == STATES.RUNNING  # what a dead worker leaves behind
    done = {t.number: t.value for t in before if t.state == STATES.COMPLETE}
    time.sleep(3)  # two missed heartbeats
    result = subprocess.run(_search(tiny_model_dir, "--trials", len(done) + 1, "--heartbeat", 1), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = _study(tmp_path).trials
    assert after[killed.number].state == STATES.FAIL
    retry = after[-1]
    assert retry.state == STATES.COMPLETE and retry.params == killed.params
    assert retry.system_attrs.get("failed_trial") == killed.number
    assert {t.number: t.value for t in after if t.number in done} == done  # completed trials untouched


def test_ctrl_c_stops_cleanly_with_exit_code_130(tiny_model_dir, tmp_path):
    worker = subprocess.Popen(_search(tiny_model_dir, "--trials", 5), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_a_trial_runs_after_one_completed(worker, tmp_path)
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err  # Optuna's own report of the interrupted trial is not printed
    states = [t.state for t in _study(tmp_path).trials]
    assert STATES.RUNNING not in states and states[0] == STATES.COMPLETE


def test_a_ctrl_c_swallowed_mid_trial_still_stops_the_search(tiny_model_dir, tmp_path, monkeypatch):
    """A library may swallow the KeyboardInterrupt of a Ctrl-C in a clean-up path; the search must
    still stop after the trial under way and exit 130, not run on to the end."""
    from click.testing import CliRunner

    import skiptune_search.cli as C
    import skiptune_search.scoring.evaluator as S
    from skiptune_search.search.interrupts import state

    real = S.fid_from_features

    def ctrl_c_swallowed(*args):
        state.seen = True  # what the handler records; the exception itself never arrives
        return real(*args)

    monkeypatch.setattr(S, "fid_from_features", ctrl_c_swallowed)
    monkeypatch.setattr(state, "seen", False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(C.main, ["search", "--model", str(tiny_model_dir), "--nfe", "3", "--n", "4",
                                         "--rungs", "4", "--trials", "5", "--batch", "4"])
    assert result.exit_code == 130
    states = [t.state for t in _study(tmp_path).trials]
    # the trial under way finished, no other began (the enqueued paper ramp waits for a resume)
    assert states == [STATES.COMPLETE, STATES.WAITING]
    assert "interrupted" in result.output
