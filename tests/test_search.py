import json
import time

import numpy as np
import optuna
import pytest
import torch

from skiptune_search.core.schedule import load_schedule
from skiptune_search.scoring.evaluator import Evaluator
from skiptune_search.search.space import Space
from skiptune_search.core.errors import StudyError as StudyMismatchError
from skiptune_search.search.study import baseline_trial, default_study_name, export_best, open_study
from skiptune_search.scoring.task import Task
from skiptune_search.search.storage import make_storage
from skiptune_search.search.objective import run_search

SPACE = Space("linear", "input", (0.5, 1.5))


@pytest.fixture
def evaluator(tiny_model_dir):
    return Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=12, seed=100), batch_size=5)


def test_search_persists_baseline_first_and_resumes(evaluator, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    task = evaluator.task
    name = default_study_name(task, SPACE)
    assert name == "tiny-model-heun-nfe3-linear-input"
    study = open_study(make_storage(url), name, task, SPACE, evaluator.controller, seed=0)
    run_search(evaluator, study, SPACE, trials=3)

    # a fresh process view of the database: everything landed
    again = optuna.load_study(study_name=name, storage=url)
    trials = again.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    first = trials[0]
    assert first.params == {"rho_inner": 1.0, "rho_outer": 1.0} and first.user_attrs["baseline"]
    assert baseline_trial(again).number == 0
    for t in trials:
        assert t.user_attrs["n"] == 12 and t.user_attrs["seeds"] == "100-111"
        assert t.user_attrs["fid"] == t.value and t.user_attrs["wall_seconds"] > 0
        assert len(t.user_attrs["rho"]) == len(evaluator.controller.skips)
    # the same command again runs nothing more; a larger --trials runs only the rest
    study = open_study(make_storage(url), name, task, SPACE, evaluator.controller, seed=0)
    run_search(evaluator, study, SPACE, trials=3)
    assert len(study.trials) == 3
    run_search(evaluator, study, SPACE, trials=4)
    assert len(study.trials) == 4


def test_progress_counts_finished_trials_after_a_dead_workers_trial(evaluator, tmp_path):
    """A trial left RUNNING by a killed worker is failed and retried; the bar still counts to --trials."""
    storage = make_storage(f"sqlite:///{tmp_path}/s.db", heartbeat=None)  # ask() outside optimize()
    study = open_study(storage, "p", evaluator.task, SPACE, evaluator.controller, 0)
    run_search(evaluator, study, SPACE, trials=1, progress=False)
    dead = study.ask()  # a worker died here; optuna's heartbeat marks such a trial failed
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    labels = []
    real = evaluator.features
    evaluator.features = lambda schedule, seeds=None, progress=True: labels.append(progress) or real(schedule, seeds, False)
    run_search(evaluator, study, SPACE, trials=3)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert labels == ["trial 2/3, N=12", "trial 3/3, N=12"]


def test_a_resumed_search_does_not_propose_its_points_again(evaluator, tmp_path):
    """The same --search-seed on resume would replay the optimizer's random stream from its start."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "r", evaluator.task, SPACE, evaluator.controller, 0, "random")
    run_search(evaluator, study, SPACE, trials=3, progress=False)  # baseline, ramp, one random point
    study = open_study(make_storage(url), "r", evaluator.task, SPACE, evaluator.controller, 0, "random")
    run_search(evaluator, study, SPACE, trials=4, progress=False)
    assert study.trials[3].params != study.trials[2].params


def test_a_baseline_stopped_by_ctrl_c_runs_again_on_resume(evaluator, tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/s.db", heartbeat=None)  # ask() outside optimize()
    study = open_study(storage, "c", evaluator.task, SPACE, evaluator.controller, 0)
    interrupted = study.ask()  # the baseline, queued first; Ctrl-C marks it failed, with no reason of its own
    assert interrupted.user_attrs.get("baseline")
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    study = open_study(storage, "c", evaluator.task, SPACE, evaluator.controller, 0)
    run_search(evaluator, study, SPACE, trials=2, progress=False)
    assert baseline_trial(study) is not None and baseline_trial(study).params == {"rho_inner": 1.0, "rho_outer": 1.0}
    # queued again behind the ramp, which was already waiting
    assert [("baseline" in t.user_attrs, "paper_ramp" in t.user_attrs) for t in study.trials[1:]] == [
        (False, True), (True, False)]


def test_trials_is_the_total_of_every_process_on_the_study(evaluator, tmp_path):
    """Another machine finishing trials meanwhile counts toward --trials: this process stops."""
    url = f"sqlite:///{tmp_path}/s.db"
    mine = open_study(make_storage(url), "t", evaluator.task, SPACE, evaluator.controller, 0)
    other = open_study(make_storage(url), "t", evaluator.task, SPACE, evaluator.controller, 1, parallel=True)
    ran_other = []

    def other_machine(study, trial):  # after this process's first trial, the other one runs two
        if not ran_other:
            ran_other.append(True)
            run_search(evaluator, other, SPACE, trials=3, progress=False)

    run_search(evaluator, mine, SPACE, trials=3, on_trial=other_machine, progress=False)
    assert len(mine.trials) == 3


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_dead_workers_trial_is_retried_from_the_first_rung():
    """The retry must pass the successive-halving check at the first rung again."""
    from skiptune_search.search.storage import retry_from_first_rung

    study = optuna.create_study()
    dead = study.ask()
    dead.report(5.0, 250)
    study._storage.set_trial_system_attr(dead._trial_id, "completed_rung_0", 5.0)
    frozen = study._storage.get_trial(dead._trial_id)
    retry_from_first_rung(optuna.storages.RetryFailedTrialCallback(max_retry=3))(study, frozen)
    retried = study.trials[-1]
    assert retried.state == optuna.trial.TrialState.WAITING and retried.system_attrs["failed_trial"] == dead.number
    assert not any(k.startswith("completed_rung_") for k in retried.system_attrs)
    assert "completed_rung_0" in study.trials[0].system_attrs  # the dead trial itself is untouched


def test_export_of_a_study_of_another_tool_says_so(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url, study_name="theirs")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(ValueError, match="not made by skiptune-search"):
        export_best(study, url)


def test_a_study_another_process_is_creating_is_waited_for_not_called_foreign(tmp_path):
    """Creating a study and writing its attributes are separate writes: a second search that finds
    the study between them waits for the attributes (seen in CI: two searches started together)."""
    import threading

    from skiptune_search.search.study import _create_or_wait

    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    attrs = {"created_by": "skiptune-search", "settings": {"task": {}}, "layout": {"arch": "x", "skips": []}}
    born = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "born")

    def finish_creating():
        time.sleep(0.5)
        for key in ("created_by", "settings", "layout"):
            storage.set_study_user_attr(born, key, attrs[key])

    writer = threading.Thread(target=finish_creating)
    writer.start()
    assert _create_or_wait(storage, "born", attrs) is False  # found, and ours once written
    writer.join()
    assert _create_or_wait(storage, "new", attrs) is True
    assert storage.get_study_user_attrs(storage.get_study_id_from_name("new")) == attrs
    assert list(storage.get_study_user_attrs(storage.get_study_id_from_name("new"))) [0] == "created_by"
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "empty")
    with pytest.raises(StudyMismatchError, match="not made by skiptune-search"):
        _create_or_wait(storage, "empty", attrs, wait_s=0.3)  # no mark of ours, ever: someone else's
    half = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "half")
    storage.set_study_user_attr(half, "created_by", "skiptune-search")  # a search killed while creating it
    storage.set_study_user_attr(half, "settings", {"task": {}})
    assert _create_or_wait(storage, "half", attrs, wait_s=0.3) is False  # the same values: finished and used
    assert storage.get_study_user_attrs(half) == attrs
    other = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "half-other")
    storage.set_study_user_attr(other, "created_by", "skiptune-search")
    storage.set_study_user_attr(other, "settings", {"task": {"nfe": 5}})
    with pytest.raises(StudyMismatchError, match="left half-made .* for other settings"):
        _create_or_wait(storage, "half-other", attrs, wait_s=0.3)
    assert "layout" not in storage.get_study_user_attrs(other)  # refused: nothing written
    theirs = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "theirs")
    storage.set_study_user_attr(theirs, "mine", "yes")
    with pytest.raises(StudyMismatchError, match="not made by skiptune-search"):
        _create_or_wait(storage, "theirs", attrs, wait_s=3600)  # attributes no search writes: refused at once


def test_features_stream_batch_by_batch_and_keep_the_first_images(evaluator):
    """Scoring N samples holds one batch of images at a time, with the same features as all at once."""
    from skiptune_search.scoring.metrics import extract_features

    identity = evaluator.controller.identity()
    everything = evaluator.images(identity, progress=False)  # 12 seeds in batches of 5
    features, first = evaluator.features(identity, progress=False, keep=7)
    assert torch.equal(first, everything[:7])
    assert torch.equal(features, extract_features(everything, evaluator.extractor, evaluator.batch_size))


def test_baseline_trial_is_the_untuned_model(evaluator, tmp_path):
    """Trial 0's FID is the FID of the model with no controller effect (same seeds)."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "b", evaluator.task, SPACE, evaluator.controller, 0)
    run_search(evaluator, study, SPACE, trials=1)
    fid, _ = evaluator.fid(evaluator.controller.identity(), progress=False)
    assert study.trials[0].value == fid


def test_resuming_with_other_settings_is_refused(evaluator, tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    open_study(storage, "x", evaluator.task, SPACE, evaluator.controller, 0)
    other = Task(model=evaluator.task.model, nfe=3, n=24, seed=100)
    with pytest.raises(StudyMismatchError, match="or another study name"):
        open_study(storage, "x", other, SPACE, evaluator.controller, 0)


def test_export_writes_the_best_completed_trial(evaluator, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "e", evaluator.task, SPACE, evaluator.controller, 0)
    run_search(evaluator, study, SPACE, trials=3)
    schedule = export_best(study, url)
    best = min(study.trials, key=lambda t: t.value)
    path = schedule.save(tmp_path / "best.json")
    loaded = load_schedule(path)
    assert loaded.source == {"study": "e", "trial": best.number, "storage": url}
    assert loaded.params == best.params
    assert loaded.metric["value"] == best.value and loaded.metric["baseline"] == study.trials[0].value
    assert loaded.tuned_for["nfe"] == 3 and loaded.tuned_for["sampler"] == "heun"
    assert json.loads(path.read_text())["format"] == "skiptune-schedule/1"
    # the exported schedule reproduces the trial's FID
    fid, _ = evaluator.fid(loaded, progress=False)
    assert fid == pytest.approx(best.value, rel=1e-9)


def test_export_without_completed_trials_is_an_error(evaluator, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "empty", evaluator.task, SPACE, evaluator.controller, 0)
    with pytest.raises(ValueError, match="no completed trial"):
        export_best(study, url)


@pytest.mark.parametrize("family, placement, knots", [
    ("per_level", "normalized", ()), ("per_layer", "both", ()), ("per_noise", "search", (0.01, 1.0, 80.0)),
])
def test_every_family_searches_and_exports(evaluator, tmp_path, family, placement, knots):
    url = f"sqlite:///{tmp_path}/s.db"
    space = Space(family, placement, (0.5, 1.5), knots)
    name = default_study_name(evaluator.task, space)
    assert name.endswith(f"-{family}-{placement}")
    study = open_study(make_storage(url), name, evaluator.task, space, evaluator.controller, 0)
    run_search(evaluator, study, space, trials=2)
    assert study.trials[0].value == pytest.approx(
        evaluator.fid(evaluator.controller.identity(), progress=False)[0], rel=1e-9)
    schedule = export_best(study, url)
    assert schedule.family == family and len(schedule.rho) == len(evaluator.controller.skips)
    assert schedule.sigma_knots == list(knots) and all(len(row) == max(len(knots), 1) for row in schedule.rho)
    assert schedule.placement in ("input", "normalized", "both")
    best = min(study.trials, key=lambda t: t.value)
    assert evaluator.fid(schedule, progress=False)[0] == pytest.approx(best.value, rel=1e-9)


def test_fid_inf_recovers_the_intercept():
    from skiptune_search.scoring.metrics import fid_inf

    ns = [250, 1000, 4000]
    assert fid_inf(ns, [40.0 + 9000.0 / n for n in ns]) == pytest.approx(40.0)


class PruneAllButBaseline(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number > 0


def test_rungs_reuse_samples_report_and_prune(tiny_model_dir, tmp_path):
    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=12, seed=100, rungs=(6, 12), objective="fid_inf"),
                          batch_size=5)
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "r", evaluator.task, SPACE, evaluator.controller, 0)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    study.pruner = PruneAllButBaseline()
    run_search(evaluator, study, SPACE, trials=3)
    base, *others = study.trials
    assert base.state == optuna.trial.TrialState.COMPLETE
    assert sorted(base.intermediate_values) == [6, 12]
    # the 12-sample FID, from 6 + 6 samples, equals the FID of the 12 seeds sampled at once
    fid12, _ = evaluator.fid(evaluator.controller.identity(), progress=False)
    assert base.user_attrs["fid"] == pytest.approx(fid12, rel=1e-6)  # batches differ: float rounding only
    assert base.user_attrs["fid_at"]["6"] == base.intermediate_values[6]
    from skiptune_search.scoring.metrics import fid_inf

    assert base.value == pytest.approx(fid_inf([6, 12], [base.intermediate_values[6], fid12]))
    assert [t.state for t in others] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [6] for t in others)
    assert export_best(study, url).source["trial"] == 0  # an export never points at a pruned trial


def _optuna_checks(rungs, reduction_factor, min_resource=None):
    """The rungs at which Optuna's own pruner (as ``make_pruner`` builds it) checks a lone trial,
    read from the rung marks it leaves on the trial."""
    from skiptune_search.search.optimizers import make_pruner

    study = optuna.create_study(pruner=make_pruner(rungs, reduction_factor, min_resource))
    trial, checked, marks = study.ask(), [], 0
    for r in rungs[:-1]:
        trial.report(1.0, r)
        assert not trial.should_prune()  # alone, it is the best at every rung
        now = sum(k.startswith("completed_rung") for k in study._storage.get_trial(trial._trial_id).system_attrs)
        checked += [r] * (now > marks)
        marks = now
    return checked


def test_rungs_that_successive_halving_never_checks_are_named():
    from skiptune_search.scoring.task import default_rungs
    from skiptune_search.search.optimizers import checked_rungs, default_reduction_factor, pruning_text, unpruned_rungs

    for optimizer in ("tpe", "cmaes", "gp", "random"):  # one check, at N/8, whatever the optimizer's share
        factor = default_reduction_factor(optimizer)
        assert unpruned_rungs((125, 1000), factor) == [] and unpruned_rungs((1000,), factor) == []
        assert unpruned_rungs(default_rungs(1000), factor) == unpruned_rungs(default_rungs(500), factor) == []
    assert unpruned_rungs((15, 125, 1000), 8) == []  # 125 ≥ 15 x 8
    assert unpruned_rungs((250, 500, 1000), 8) == [500]
    assert unpruned_rungs((111, 333, 1000), 3) == [] and unpruned_rungs((250, 500, 1000), 3) == [500]
    assert unpruned_rungs((250, 800, 1000), 3) == []  # 800 ≥ 750: the second check falls there
    for rungs, factor, start in (((125, 1000), 3, None), ((15, 125, 1000), 8, None),
                                 ((250, 500, 1000), 8, None), ((250, 500, 800, 1000), 3, None),
                                 ((63, 250, 1000), 4, None), ((63, 250, 1000), 4, 62), ((4, 5, 16), 2, 2)):
        assert checked_rungs(rungs, factor, start) == _optuna_checks(rungs, factor, start), (rungs, factor, start)
    assert checked_rungs((63, 250, 1000), 4, 62) == [63, 250] and checked_rungs((63, 250, 1000), 4) == [63]
    assert pruning_text((250, 1000), 3) == "successive halving keeping the best third at 250"
    assert pruning_text((63, 250, 1000), 4, 62) == "successive halving keeping the best quarter at 63 and 250"
    assert pruning_text((1000,), 3) == "no pruning" and pruning_text((125, 1000), 0) == "no pruning"  # GP's
    # and Optuna's pruner agrees: a trial worse than two others is not pruned at 500, is at 750
    study = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=250, reduction_factor=3))
    for value in (1.0, 2.0):
        t = study.ask()
        for step in (250, 500, 750):
            t.report(value, step)
            t.should_prune()
        study.tell(t, value)
    worst = study.ask()
    worst.report(0.5, 250)
    assert not worst.should_prune()  # best at the first rung: promoted
    worst.report(9.0, 500)
    assert not worst.should_prune()  # 500 is no rung of the pruner's
    worst.report(9.0, 750)
    assert worst.should_prune()


def test_a_study_keeps_the_pruning_it_was_created_with(evaluator, tmp_path):
    """A new study records its successive halving factor, its optimizer's unless told (TPE keeps a
    third, CMA-ES an eighth); resumed, it keeps it whatever the caller (a later default) asks for; a
    study from before the factor was recorded resumes with 3."""
    from skiptune_search.search.optimizers import LEGACY_REDUCTION_FACTOR

    task = Task(model=evaluator.task.model, nfe=3, n=12, seed=100, rungs=(6, 12))
    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    study = open_study(storage, "new", task, SPACE, evaluator.controller, 0)  # TPE
    assert study.user_attrs["reduction_factor"] == 3
    assert study.pruner._reduction_factor == 3  # Optuna's pruner, as built
    cma = open_study(storage, "cma", task, SPACE, evaluator.controller, 0, optimizer="cmaes")
    assert cma.user_attrs["reduction_factor"] == cma.pruner._reduction_factor == 8
    gp = open_study(storage, "gp", task, SPACE, evaluator.controller, 0, optimizer="gp")  # models completed trials only
    assert gp.user_attrs["reduction_factor"] == 0 and isinstance(gp.pruner, optuna.pruners.NopPruner)
    other = 5
    resumed = open_study(storage, "new", task, SPACE, evaluator.controller, 0, reduction_factor=other)
    assert resumed.pruner._reduction_factor == 3
    assert open_study(storage, "other", task, SPACE, evaluator.controller, 0,
                      reduction_factor=other).pruner._reduction_factor == other
    old = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "old")  # as made before the factor
    for key, value in study.user_attrs.items():
        if key != "reduction_factor":
            storage.set_study_user_attr(old, key, value)
    resumed = open_study(storage, "old", task, SPACE, evaluator.controller, 0)
    assert resumed.pruner._reduction_factor == LEGACY_REDUCTION_FACTOR == 3
    assert "reduction_factor" not in resumed.user_attrs


def test_rungs_must_end_at_n():
    with pytest.raises(ValueError, match="up to n = 12"):
        Task(n=12, rungs=(6, 10))
    with pytest.raises(ValueError, match="two rungs"):
        Task(n=12, objective="fid_inf")


@pytest.mark.parametrize("optimizer", ["cmaes", "gp", "random", "grid"])
def test_every_optimizer_runs(evaluator, tmp_path, optimizer):
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), optimizer, evaluator.task, SPACE, evaluator.controller, 0, optimizer)
    run_search(evaluator, study, SPACE, trials=3)
    assert len(study.trials) == 3 and study.trials[0].params == {"rho_inner": 1.0, "rho_outer": 1.0}
    if optimizer == "grid":
        grid = {0.5 + 0.1 * i for i in range(11)}
        assert all(any(abs(v - g) < 1e-9 for g in grid) for t in study.trials for v in t.params.values())
    else:  # the paper-style ramp is the second trial
        assert study.trials[1].params == {"rho_inner": 0.8, "rho_outer": 1.0}


def test_a_search_naming_no_optimizer_gets_its_family_s_default(evaluator, tmp_path, monkeypatch):
    """Without an optimizer, a search uses its method's default (table 4's pick; TPE where table 4
    has not decided); one named is used as it is."""
    from skiptune_search import search
    from skiptune_search.search import default_optimizer
    from skiptune_search.search.tune import prepare

    assert default_optimizer("linear") == "cmaes"  # table 4's picks
    assert default_optimizer("per_layer") == default_optimizer("per_noise") == "gp"
    assert default_optimizer("freeu") == default_optimizer("linear_freeu") == "gp"  # FreeU's σ window searched
    monkeypatch.setattr(search, "DEFAULT_OPTIMIZERS", {"linear": "gp"})  # as when it picks another
    assert default_optimizer("linear") == "gp"
    monkeypatch.undo()  # the real table again
    assert default_optimizer("per_level") == default_optimizer("freeu", freeu_window=False) == "tpe"
    assert default_optimizer("linear", placement="search") == "tpe"  # a categorical CMA-ES would sample at random
    from skiptune_search.search.optimizers import CmaEs

    kinds = {"cmaes": CmaEs, "tpe": optuna.samplers.TPESampler}
    url = f"sqlite:///{tmp_path}/s.db"
    for name, family, optimizer, expected in (("a", "linear", None, "cmaes"), ("b", "linear", "tpe", "tpe"),
                                              ("c", "per_level", None, "tpe")):
        _, study = prepare(evaluator, url, family=family, study=name, optimizer=optimizer)
        assert type(study.sampler) is kinds[expected] and study.user_attrs["optimizer"] == expected, name


def test_a_resumed_study_keeps_the_optimizer_it_was_made_with(evaluator, tmp_path, monkeypatch):
    """A default that changes (table 4 picks another optimizer for a family) leaves a study made
    before alone; an optimizer named against the study's own is refused before anything is written;
    a study from before optimizers were recorded searched with TPE, every search's default then."""
    import sqlite3

    from skiptune_search import search
    from skiptune_search.core.errors import StudyError
    from skiptune_search.search.optimizers import CmaEs
    from skiptune_search.search.tune import prepare

    url = f"sqlite:///{tmp_path}/s.db"
    prepare(evaluator, url, study="made-with-tpe", optimizer="tpe")
    monkeypatch.setattr(search, "DEFAULT_OPTIMIZERS", {"linear": "cmaes"})  # linear's default changes
    _, study = prepare(evaluator, url, study="made-with-tpe")
    assert type(study.sampler) is optuna.samplers.TPESampler
    before = study.user_attrs
    with pytest.raises(StudyError, match="study 'made-with-tpe' searches with tpe, the optimizer it was made with: "
                                         "resume it without an optimizer"):
        prepare(evaluator, url, study="made-with-tpe", optimizer="cmaes")
    assert optuna.load_study(study_name="made-with-tpe", storage=url).user_attrs == before
    _, study = prepare(evaluator, url, study="made-with-cmaes")
    assert type(prepare(evaluator, url, study="made-with-cmaes", optimizer="cmaes")[1].sampler) is CmaEs
    with sqlite3.connect(tmp_path / "s.db") as db:  # as a study made before the optimizer was recorded
        db.execute("DELETE FROM study_user_attributes WHERE key = 'optimizer'")
    assert type(prepare(evaluator, url, study="made-with-cmaes")[1].sampler) is optuna.samplers.TPESampler
    assert optuna.load_study(study_name="made-with-cmaes", storage=url).user_attrs["optimizer"] == "tpe"
    with sqlite3.connect(tmp_path / "s.db") as db:  # one named for such a study is taken, and recorded
        db.execute("DELETE FROM study_user_attributes WHERE key = 'optimizer'")
    assert type(prepare(evaluator, url, study="made-with-cmaes", optimizer="cmaes")[1].sampler) is CmaEs
    assert optuna.load_study(study_name="made-with-cmaes", storage=url).user_attrs["optimizer"] == "cmaes"


def test_cma_es_state_is_read_back_without_running_code_from_the_storage(tmp_path):
    """Optuna's CMA-ES pickles its state into the trials: ours reads it back, so the search goes on
    from generation to generation, but a state that would build anything else is refused and not run."""
    import io
    import pickle

    from skiptune_search.core.errors import StudyError
    from skiptune_search.search.optimizers import CmaEs, _CmaState, make_sampler

    assert type(make_sampler("cmaes", SPACE, [], 0)) is CmaEs
    study = optuna.create_study(sampler=CmaEs(seed=0, popsize=4))
    toy = lambda t: (t.suggest_float("a", 0, 1) - 0.3) ** 2 + t.suggest_float("b", 0, 1)  # noqa: E731
    study.optimize(toy, n_trials=12)
    assert max(t.system_attrs.get("cma:generation", -1) for t in study.trials) >= 2  # restored, told, went on
    state = study.sampler._restore_optimizer(study.trials)
    for protocol in (3, 4, 5):  # 5: numpy arrays through _frombuffer, Python 3.14's default protocol
        data = io.BytesIO(pickle.dumps(state, protocol=protocol))
        assert (_CmaState(data).load()._mean == state._mean).all()

    evidence = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(evidence), "w")

    dist = optuna.distributions.FloatDistribution(0, 1)
    study.add_trial(optuna.trial.create_trial(params={"a": 0.5, "b": 0.5}, distributions={"a": dist, "b": dist},
                                              value=1.0, system_attrs={"cma:optimizer:0": pickle.dumps(Payload()).hex(),
                                                                       "cma:generation": 3}))
    with pytest.raises(StudyError, match="would build io.open, which no CMA-ES state does"):
        study.optimize(toy, n_trials=1)
    assert not evidence.exists()


def test_cmaes_counts_pruned_trials_toward_its_generations():
    """With successive halving most trials are pruned: CMA-ES tells them at their last rung's value,
    so its generations go on (a plain CmaEsSampler stays at its first, waiting for completed trials)."""
    from skiptune_search.search.optimizers import CmaEs, make_pruner

    def toy(trial):  # reported at a first rung of 2 and pruned there, or scored to 16
        value = (trial.suggest_float("a", 0, 1) - 0.3) ** 2 + trial.suggest_float("b", 0, 1)
        trial.report(value + 0.1, 2)
        if trial.should_prune():
            raise optuna.TrialPruned()
        return value

    generations = {}
    for name, sampler in (("ours", CmaEs(seed=0, popsize=4)),
                          ("plain", optuna.samplers.CmaEsSampler(seed=0, popsize=4))):
        study = optuna.create_study(sampler=sampler, pruner=make_pruner((2, 16), 8))
        study.optimize(toy, n_trials=24)
        assert sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials) >= 12  # mostly pruned
        generations[name] = max(t.system_attrs.get("cma:generation", -1) for t in study.trials)
    assert generations["ours"] >= 4 and generations["plain"] <= 1, generations


def test_kid_objective_with_a_folder_reference(tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    import skiptune_search.scoring.evaluator as S
    from skiptune_search.core.errors import ReferenceStatsError
    from skiptune_search.scoring.metrics import ReferenceStats

    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.setattr(S, "CACHE_DIR", tmp_path / "cache")
    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=8, objective="kid", reference=str(folder)),
                          batch_size=8)
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "k", evaluator.task, SPACE, evaluator.controller, 0)
    run_search(evaluator, study, SPACE, trials=2)
    for t in study.trials:
        assert t.value == t.user_attrs["kid"] and "fid" in t.user_attrs
    stats_only = ReferenceStats(np.zeros(1280), np.eye(1280), "efficientnet-lite0", 1).save(tmp_path / "mu.npz")
    with pytest.raises(ReferenceStatsError, match="objective kid needs reference features"):
        Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=8, objective="kid", reference=str(stats_only))).reference


def test_a_study_of_other_weights_of_the_same_model_is_refused(evaluator, tmp_path):
    """train-default retrains a model in place: its old study must not resume with the new weights."""
    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    open_study(storage, "w", evaluator.task, SPACE, evaluator.controller, 0)
    open_study(storage, "w", evaluator.task, SPACE, evaluator.controller, 0)  # the same weights resume
    with torch.no_grad():
        next(evaluator.controller.unet.parameters()).add_(1e-3)
    with pytest.raises(StudyMismatchError, match="other weights"):
        open_study(storage, "w", evaluator.task, SPACE, evaluator.controller, 0)


def test_a_study_from_before_sigma_grids_and_prompts_resumes(evaluator, tmp_path):
    """Studies stored before the σ grid, prompts, precision and image size joined the task ran on
    the Karras grid, unprompted, in fp32, at the model's own size."""
    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    study = open_study(storage, "old", evaluator.task, SPACE, evaluator.controller, 0)
    settings = study.user_attrs["settings"]
    for key in ("sigma_grid", "prompts", "guidance", "precision", "height", "width"):
        del settings["task"][key]
    study.set_user_attr("settings", settings)
    open_study(storage, "old", evaluator.task, SPACE, evaluator.controller, 0)  # no mismatch
    with pytest.raises(StudyMismatchError, match="sigma_grid: karras \\(now model\\)"):
        open_study(storage, "old", Task(model=evaluator.task.model, nfe=3, n=12, seed=100, sigma_grid="model"),
                   SPACE, evaluator.controller, 0)


def test_params_at_edge_names_the_rho_near_a_bound():
    from skiptune_search.search.study import params_at_edge

    params = {"rho_inner": 1.495, "rho_outer": 0.9, "rho_7px": 0.505, "placement": "input"}
    assert params_at_edge(params, (0.5, 1.5)) == ["rho_inner = 1.495", "rho_7px = 0.505"]
    assert params_at_edge({"rho_inner": 1.0}, (0.5, 1.5)) == []


def test_bf16_runs_the_model_under_autocast_and_is_its_own_task(evaluator, tmp_path):
    """precision bf16: the UNet's convolutions compute in bf16 while the samples stay close to
    fp32's; a study and its exported schedule are for that precision, and an fp32 search of the
    same name is refused instead of mixing FIDs."""
    bf16 = Evaluator(Task(model=evaluator.task.model, nfe=3, n=12, seed=100, precision="bf16"), batch_size=5)
    seen = set()
    conv = next(m for m in bf16.controller.unet.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    identity = bf16.controller.identity()
    low, full = bf16.images(identity, progress=False), evaluator.images(identity, progress=False)
    assert seen == {torch.bfloat16}
    diff = (low.int() - full.int()).abs()
    assert 0 < diff.float().mean() < 4  # bf16 rounding, not another sample
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(make_storage(url), "b", bf16.task, SPACE, bf16.controller, 0)
    run_search(bf16, study, SPACE, trials=2)
    assert export_best(study, url).tuned_for["precision"] == "bf16"
    with pytest.raises(StudyMismatchError, match="precision: bf16 \\(now fp32\\)"):
        open_study(make_storage(url), "b", evaluator.task, SPACE, evaluator.controller, 0)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        Task(precision="fp16")


def test_a_queued_trial_is_started_by_one_process_only(tmp_path):
    """Two processes popping one queued trial: the claim is one conditional UPDATE, so only the first
    starts it (Optuna's read-then-write let both start it on SQLite, and the second to end it failed
    with 'Cannot tell a COMPLETE trial'); a finished trial is not claimed, and nothing is raised."""
    url = f"sqlite:///{tmp_path}/s.db"
    first, second = make_storage(url, heartbeat=None), make_storage(url, heartbeat=None)
    study = optuna.create_study(storage=first, study_name="q")
    study.enqueue_trial({"x": 1.0})
    (waiting,) = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    running = optuna.trial.TrialState.RUNNING
    assert first.set_trial_state_values(waiting._trial_id, running) is True
    assert second.set_trial_state_values(waiting._trial_id, running) is False  # already started
    assert first.get_trial(waiting._trial_id).state == running
    first.set_trial_state_values(waiting._trial_id, optuna.trial.TrialState.COMPLETE, [1.0])
    assert second.set_trial_state_values(waiting._trial_id, running) is False  # finished: not claimed
    assert first.get_trial(waiting._trial_id).state == optuna.trial.TrialState.COMPLETE
    trial = optuna.load_study(study_name="q", storage=second).ask()  # Optuna's own pop still works
    assert trial.number == 1
