"""Tuning by eye (search/eye.py, the eye command): candidates' grids, a scripted judge through
optuna-dashboard's own storage calls, resuming after a kill, the mixed mode, export, refusals;
and (slow) a scripted person in headless Chromium on the dashboard's own page."""

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch

from skiptune_search.core.schedule import load_schedule
from skiptune_search.scoring.evaluator import Evaluator
from skiptune_search.scoring.task import Task
from skiptune_search.search import eye
from skiptune_search.search.space import Space

EXE = str(Path(sys.executable).parent / "skiptune-search")
TARGET = {"rho_inner": 0.7, "rho_outer": 1.3}  # the scripted person's hidden taste
TINY = ["--nfe", "3", "--grid", "4", "--batch", "4", "--threads", "1"]


def distance(params: dict) -> float:
    return math.dist([params[k] for k in TARGET], list(TARGET.values()))


def shown(study) -> list:
    """The candidates the dashboard shows: running or complete, a grid uploaded, never clicked worst."""
    from optuna_dashboard.preferential._system_attrs import get_preferences

    worse = {w for _, w in get_preferences(study._storage.get_study_system_attrs(study._study_id))}
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("RUNNING", "COMPLETE")
            and eye.GRID_ATTR in t.user_attrs and t.number not in worse]


def judge_once(url: str, name: str, show: int) -> int | None:
    """When a full set is shown, mark its candidate farthest from TARGET as the worst, through the
    call the dashboard's 'Worst' button makes (report_history: the choice and its history entry)."""
    import sqlite3

    from optuna_dashboard._preferential_history import NewHistory, report_history

    if url.startswith("sqlite:///"):  # the eye process may still be creating the tables: read-only until the study is there
        try:
            with sqlite3.connect(f"file:{url[len('sqlite:///'):]}?mode=ro", uri=True) as db:
                if not db.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone():
                    return None
        except sqlite3.Error:  # no file or no tables yet
            return None
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:  # not created yet
        return None
    candidates = shown(study)
    if len(candidates) < show:
        return None
    worst = max(candidates, key=lambda t: distance(t.params))
    report_history(study._study_id, study._storage,
                   NewHistory(mode="ChooseWorst", candidates=[t.number for t in candidates], clicked=worst.number))
    return worst.number


def judging(url: str, name: str, show: int, stop: threading.Event) -> threading.Thread:
    def loop():
        while not stop.is_set():
            try:
                judge_once(url, name, show)
            except optuna.exceptions.OptunaError:
                pass  # the database is not there yet
            time.sleep(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_candidates_sample_the_same_noise_and_differ_only_by_schedule(tiny_model_dir):
    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=4, rungs=(4,), seed=7), batch_size=4)
    space, ctl = Space("linear"), evaluator.controller
    calls: list[list[torch.Tensor]] = []
    hook = evaluator.denoiser.register_forward_pre_hook(lambda module, args: calls[-1].append(args[0].clone()))
    grids = []
    try:
        for params in ({"rho_inner": 1.0, "rho_outer": 1.0}, {"rho_inner": 0.6, "rho_outer": 1.4}):
            calls.append([])
            grids.append(eye.render(evaluator, space.schedule(ctl.arch, ctl.skips, params)))
    finally:
        hook.remove()
    assert len(calls[0]) == len(calls[1]) == 3 and calls[0][0].shape[0] == 4  # Heun NFE 3, one batch of 4
    assert torch.equal(calls[0][0], calls[1][0])  # the same noise (seeds 7..10) for both candidates
    assert not torch.equal(calls[0][-1], calls[1][-1])  # then the schedules part ways
    assert grids[0].dtype == torch.uint8 and grids[0].shape == grids[1].shape and not torch.equal(*grids)


def test_eye_resumes_after_a_kill_with_every_choice_and_exports_the_preferred(tiny_model_dir, tmp_path, run):
    url, name = "sqlite:///studies/skiptune.db", "e"
    abs_url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    command = [EXE, "eye", "--model", str(tiny_model_dir), *TINY, "--show", "2", "--choices", "3", "--study", name,
               "--no-dashboard"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while judge_once(abs_url, name, 2) is None:
            assert time.monotonic() < deadline and first.poll() is None, first.stdout.read() if first.poll() else ""
            time.sleep(0.2)
        # the next candidate shown: the process waits for the person; it is killed there
        study = optuna.load_study(study_name=name, storage=abs_url)
        while len(shown(study)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    study = optuna.load_study(study_name=name, storage=abs_url)
    before = {k: v for k, v in eye._system_attrs(study).items() if k.startswith("preference:")}
    assert eye.choices(study) == 1 and len(shown(study)) == 2
    kept = [t.number for t in shown(study)]

    stop = threading.Event()
    judging(abs_url, name, 2, stop)
    try:
        result = run("eye", "--model", tiny_model_dir, *TINY, "--show", 2, "--choices", 3, "--study", name,
                     "--no-dashboard")
    finally:
        stop.set()
    assert result.exit_code == 0, result.output
    # the judge may mark the set the killed run left shown before the header is printed
    assert re.search(r"eye study 'e' in sqlite:///studies/skiptune.db: [12] of 3 choices so far", result.output)
    assert "choice 3/3 recorded" in result.output and "most preferred:" in result.output
    study = optuna.load_study(study_name=name, storage=abs_url)
    after = eye._system_attrs(study)
    assert all(after[k] == v for k, v in before.items())  # the killed run's choice, exactly as recorded
    assert eye.choices(study) == 3
    assert all(study.trials[n].state.name != "FAIL" for n in kept)  # shown before the kill: still candidates
    marks = [t.user_attrs for t in study.trials]
    assert sum(bool(m.get("baseline")) for m in marks) == 1 and sum(bool(m.get("paper_ramp")) for m in marks) == 1
    exported = tmp_path / "studies" / "e.best.json"
    schedule = load_schedule(exported)
    best, made = eye.preferred_trial(study)
    assert made == 3 and schedule.source["trial"] == best.number and schedule.params == best.params
    assert schedule.metric == {"name": "eye", "comparisons": 3, "n": 4, "seeds": "0-3"}
    # export writes the same file from the study
    again = run("export", "--study", name, "-o", "again.json")
    assert again.exit_code == 0 and f"trial {best.number}, chosen by eye after 3 choices" in again.output
    strip = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "created"}  # noqa: E731
    assert strip(tmp_path / "again.json") == strip(exported)
    # the study list shows no made-up FID for it (baseline, best, change), nor an optimizer of its own
    listed = run("studies")
    assert [line for line in listed.output.splitlines() if line.startswith("e ")][0].split()[-4:] == ["-"] * 4


def test_mixed_mode_compares_a_fid_studys_best_and_links_both(tiny_model_dir, tmp_path, run):
    search = run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 8, "--rungs", 8, "--trials", 4, "--batch", 8,
                 "--threads", 1)
    assert search.exit_code == 0, search.output
    fid_name = "tiny-model-heun-nfe3-linear-input"
    url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    refused = run("eye", "--from-study", fid_name, "--nfe", 5, "--no-dashboard")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert f"Error: --nfe: the eye study takes it from --from-study {fid_name}; leave it out" in refused.output
    stop = threading.Event()
    judging(url, f"{fid_name}-eye", 4, stop)
    try:
        result = run("eye", "--from-study", fid_name, "--top", 2, "--grid", 4, "--batch", 4, "--threads", 1,
                     "--show", 4, "--choices", 1, "--no-dashboard")
    finally:
        stop.set()
    assert result.exit_code == 0, result.output
    fid = optuna.load_study(study_name=fid_name, storage=url)
    eye_study = optuna.load_study(study_name=f"{fid_name}-eye", storage=url)
    assert fid.user_attrs["eye_studies"] == [f"{fid_name}-eye"]
    assert eye_study.user_attrs["from_study"] == {"study": fid_name, "top": 2}
    from_fid = [t.user_attrs["fid_trial"] for t in eye_study.trials if "fid_trial" in t.user_attrs]
    # the best two beyond the first trials (the untuned model and the ramp are candidates anyway)
    best_two = sorted((t for t in fid.trials if t.state.name == "COMPLETE" and t.number >= 2), key=lambda t: t.value)
    assert len(best_two) == 2 and not any(t.user_attrs.get("paper_ramp") for t in best_two)
    assert [m["trial"] for m in sorted(from_fid, key=lambda m: m["value"])] == [t.number for t in best_two]
    assert {t.params["rho_inner"] for t in eye_study.trials if "fid_trial" in t.user_attrs} == {
        t.params["rho_inner"] for t in best_two}
    # a FID search on the eye study's name is refused, and the eye study is untouched
    rows = [(t.number, t.state.name, t.params) for t in eye_study.trials]
    clash = run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 8, "--rungs", 8, "--trials", 4, "--batch", 8,
                "--study", f"{fid_name}-eye")
    assert clash.exit_code == 2 and "is judged by eye (a preferential study), not by FID" in clash.output
    assert [(t.number, t.state.name, t.params) for t in
            optuna.load_study(study_name=f"{fid_name}-eye", storage=url).trials] == rows
    # and an eye study on the FID study's name
    clash = run("eye", "--model", tiny_model_dir, *TINY, "--study", fid_name, "--no-dashboard")
    assert clash.exit_code == 2 and "is a FID study, not one judged by eye: it is left untouched" in clash.output
    assert len(optuna.load_study(study_name=fid_name, storage=url).trials) == 4


def test_eye_refusals_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, run, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        result = run("eye", "--model", tiny_model_dir, *TINY, "--port", port)
        assert result.exit_code == 2 and f"Error: --port: cannot serve on 127.0.0.1:{port}" in result.output
    finally:
        busy.close()
    result = run("eye", "--model", tiny_model_dir, *TINY, "--host", " ")
    assert result.exit_code == 2 and result.output.startswith("Error: --host: an empty host would serve on every")
    assert not (tmp_path / "studies").exists()
    # a study with no choice yet exports nothing
    storage = f"sqlite:///{tmp_path}/studies/skiptune.db"
    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=4, rungs=(4,)), batch_size=4)
    eye.prepare_eye(evaluator, storage, study="fresh")
    result = run("export", "--study", "fresh", "-o", "x.json")
    assert result.exit_code == 2 and result.output == (
        "Error: study 'fresh' has no recorded choice yet: mark the worst grid of a set in optuna-dashboard first\n")
    assert not (tmp_path / "x.json").exists()
    result = run("report", "--study", "fresh", "-o", "r.html", "--samples", 0)
    assert result.exit_code == 2 and "was judged by eye and holds no FID to report" in result.output
    # without the extra: one line naming it, before any work
    monkeypatch.setitem(sys.modules, "botorch", None)
    monkeypatch.delitem(sys.modules, "optuna_dashboard.preferential.samplers.gp", raising=False)
    result = run("eye", "--model", tiny_model_dir, *TINY, "--study", "other")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "needs botorch and gpytorch" in result.output and "pip install 'skiptune-search[eye]'" in result.output
    assert "other" not in {s.study_name for s in optuna.get_all_study_summaries(storage)}


def test_an_eye_schedule_says_so_and_a_made_up_one_is_refused(tmp_path):
    from skiptune_search.core.errors import ScheduleError

    root = Path(__file__).parent.parent
    good = json.loads((root / "configs/schedules/fashion-mnist-edm-heun-nfe9-linear-input.json").read_text())
    good["metric"] = {"name": "eye", "comparisons": 12, "n": 16, "seeds": "0-15"}
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert load_schedule(tmp_path / "ok.json").metric["comparisons"] == 12
    del good["metric"]["comparisons"]
    (tmp_path / "bad.json").write_text(json.dumps(good))
    with pytest.raises(ScheduleError, match=r"bad.json: metric is 'eye' \(chosen by eye\) but has no comparisons"):
        load_schedule(tmp_path / "bad.json")


def test_most_preferred_weighs_whom_a_candidate_beat():
    # 3 beat 0, 1 and 2 over three sets; 4 came last and beat only 3 once: 4 is preferred over 3
    pairs = [(3, 0), (1, 0), (3, 2), (1, 2), (3, 1), (4, 1), (4, 3)]
    scores = eye.bradley_terry(pairs)
    assert max(scores, key=scores.get) == 4 and scores[3] > scores[1] > scores[0]


CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(CHROMEDRIVER is None or shutil.which("chromium") is None,
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_a_person_in_chromium_steers_the_search_to_their_taste(tiny_model_dir, tmp_path):
    """A scripted person on optuna-dashboard's own page: each round it clicks 'Worst' on the grid of
    the candidate farthest from a hidden target ρ; the exported schedule ends closer to the target
    than any of the first set was."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    show, rounds, name = 3, 8, "by-eye"
    url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    process = subprocess.Popen([EXE, "eye", "--model", str(tiny_model_dir), *TINY, "--show", str(show), "--choices",
                                str(rounds), "--study", name, "--port", str(port)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1800,1400",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    browser = None
    first_set, clicks, path = None, [], []  # path: the preferred candidate's distance after each choice
    try:
        deadline = time.monotonic() + 900
        study = None
        while study is None:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            try:
                if (tmp_path / "studies" / "skiptune.db").exists():
                    study = optuna.load_study(study_name=name, storage=url)
            except KeyError:  # not created yet
                pass
            time.sleep(1)
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        page = f"http://127.0.0.1:{port}/{eye.study_page(study)}"
        while eye.choices(study) < rounds:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            candidates = shown(study)
            if len(candidates) < show:
                time.sleep(0.5)
                continue
            browser.get(page)  # what a person sees now (the page also refreshes on its own)
            cards = {}
            for _ in range(60):
                for heading in browser.find_elements(By.TAG_NAME, "h5"):
                    number = int(heading.text.split()[-1])
                    card = heading.find_element(By.XPATH, "./ancestor::div[.//button[normalize-space()='Worst']][1]")
                    if card.find_elements(By.TAG_NAME, "img"):
                        cards[number] = card
                if len(cards) == show:
                    break
                time.sleep(0.5)
            assert sorted(cards) == sorted(t.number for t in candidates)
            params = {t.number: t.params for t in candidates}
            first_set = first_set or [distance(p) for p in params.values()]
            worst = max(cards, key=lambda n: distance(params[n]))
            made = eye.choices(study)
            cards[worst].find_element(By.XPATH, ".//button[normalize-space()='Worst']").click()
            clicks.append((worst, round(distance(params[worst]), 3)))
            while eye.choices(study) == made:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            path.append(round(distance(eye.preferred_trial(study)[0].params), 3))
        out, _ = process.communicate(timeout=120)
    finally:
        if browser is not None:
            browser.quit()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    schedule = load_schedule(tmp_path / "studies" / f"{name}.best.json")
    chosen = distance(schedule.params)
    print(f"\nscripted person: {rounds} choices, sets of {show}; first set's distances to the target "
          f"{[round(d, 3) for d in first_set]}; clicked worst {clicks}; chosen trial {schedule.source['trial']} "
          f"{schedule.params} at distance {chosen:.3f}; the preferred one's distance after each choice {path}")
    assert schedule.metric["comparisons"] == rounds
    history = [k for k in eye._system_attrs(optuna.load_study(study_name=name, storage=url))
               if k.startswith("preference:history")]
    assert len(history) == rounds  # every choice came through the page
    assert chosen < min(first_set) - 0.05
