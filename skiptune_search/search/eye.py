"""Tune by eye: a preferential study that optuna-dashboard shows as sets of sample grids; the person
marks the worst grid of each set, and optuna-dashboard's ``PreferentialGPSampler`` proposes the
next candidate from every choice so far.

A candidate is a schedule of the study's space (any family: ``Space`` suggests it as a FID search
does), rendered as one grid of the same seeds (and so the same prompts) for every candidate: only
the schedule differs. The untuned model comes first, then FreeU's published preset (FreeU
families) and the paper-style ramp (linear families); in the mixed mode, the best trials of a FID
study of the same task and space next, so that a person's time goes to the close calls.

The choices live in the storage (optuna-dashboard's study system attributes), so a study is resumed
as any other, and several people may judge it: each serves the dashboard on the shared storage
and artifact folder. The most preferred candidate (``preferred_trial``) is what ``export`` writes.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import optuna

from ..core.errors import InputError, NonFiniteSamplesError, StudyError
from ..core.schedule import RhoSchedule
from ..models.loaders import weights_fingerprint
from ..scoring.task import Task, with_legacy_defaults
from . import interrupts
from .objective import calls_key, upload_grid
from .space import Space, first_marks
from .storage import make_storage, shown_url, storage_faults
from .study import (
    MARKER, _check_settings, _create_or_wait, _process_gone, check_study_name, is_eye, is_own,
    study_layout, study_settings, study_space, tuned_for, worker_id,
)

EXTRA = "pip install 'skiptune-search[eye]'"
GRID_ATTR = "grid"  # the user attribute of a candidate that names its grid artifact (the dashboard shows it)
MAX_SHOW = 16  # candidates in one set: more does not fit a screen
MAX_FAILED_IN_A_ROW = 3  # candidates with non-finite samples in a row before the search gives up

# optuna-dashboard's own study system attributes (optuna_dashboard.preferential), written by
# create_study and read by its UI; written here in this tool's order (before the study is ours)
_PREFERENTIAL = "preference:is_preferential"
_N_GENERATE = "preference:n_generate"
_COMPONENT = "preference:component"
_PREFERENCE_PREFIX = "preference:values"
_SKIP_PREFIX = "preference:skip_trial:"


def preferential_sampler(seed: int | None):
    """optuna-dashboard's ``PreferentialGPSampler`` (BoTorch and GPyTorch, the ``eye`` extra); one
    line naming the extra when they are missing."""
    try:
        from optuna_dashboard.preferential.samplers.gp import PreferentialGPSampler
    except ImportError as exc:
        missing = exc.name or "botorch"
        raise InputError(f"tuning by eye needs botorch and gpytorch (optuna-dashboard's preferential sampler), and "
                         f"{missing} is not installed: {EXTRA}") from None
    return PreferentialGPSampler(seed=seed)


def eye_task(settings: dict, grid: int) -> Task:
    """The task of an eye study on a FID study's ``settings``: the same model, sampler, NFE, σ grid,
    first seed, prompts, guidance, size and precision; ``grid`` samples per candidate."""
    task = with_legacy_defaults(settings["task"])
    keep = ("model", "sampler", "nfe", "seed", "sigma_grid", "prompts", "guidance", "height", "width", "precision")
    return Task(**{k: task[k] for k in keep}, n=grid, rungs=(grid,))


# --- the study ----------------------------------------------------------------------------------------
def prepare_eye(evaluator, storage_url: str, *, study: str | None = None, source: optuna.Study | None = None,
                top: int = 3, show: int = 4, search_seed: int = 0, family: str = "linear", placement: str = "input",
                rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3, freeu_window: bool = True,
                freeu_variant: str = "v1-stages"):
    """The space and the opened eye study for ``evaluator``'s task (its n: the grid's samples): the
    space of ``source`` (a FID study; mixed mode), else the family's, built as a FID search builds
    it; the study named ``study``, else after ``source`` or the task, with ``-eye`` at the end."""
    from .study import default_study_name
    from .tune import make_space

    ctl = evaluator.controller
    if source is not None:
        space = study_space(source)
    else:
        if placement != "search":
            ctl.check_placement(placement)
        space = make_space(evaluator, family, placement, rho_range, knots, freeu_window, freeu_variant)
    name = study or f"{source.study_name if source is not None else default_study_name(evaluator.task, space)}-eye"
    storage = make_storage(storage_url, heartbeat=None)  # candidates wait for a person, not a heartbeat
    return space, open_eye_study(storage, name, evaluator.task, space, ctl, search_seed, show, source, top)


@storage_faults
def open_eye_study(storage: optuna.storages.BaseStorage, name: str, task: Task, space: Space, controller,
                   seed: int = 0, show: int = 4, source: optuna.Study | None = None, top: int = 0):
    """Create the preferential study, or resume it (its task, space and weights checked as a FID
    search checks them; nothing is written to a study that fails a check): a
    ``PreferentialStudy`` showing ``show`` candidates at a time, each one's grid artifact the
    dashboard's feedback component. Candidates a dead process left half-rendered (no grid) are
    failed; the first candidates (untuned, preset, ramp) are queued where they are missing. With
    ``source`` (a FID study of this task's space), its ``top`` best completed trials are queued as
    candidates too, and each study records the other (``from_study``, ``eye_studies``)."""
    from optuna_dashboard.preferential import PreferentialStudy

    check_study_name(name)
    if isinstance(show, bool) or not isinstance(show, int) or not 2 <= show <= MAX_SHOW:
        raise InputError(f"a set of {show!r} candidates: show between 2 and {MAX_SHOW} at a time", option="show")
    space.check(controller.skips)
    sampler = preferential_sampler(seed)  # the extra, before anything is written
    link = _check_source(source, space, top) if source is not None else None
    arch, skips = controller.arch, controller.skips
    weights = weights_fingerprint(controller.unet)
    settings = json.loads(json.dumps({"task": task.scoring_key(), **space.as_dict(), "judge": "eye"}))
    attrs = {"weights": weights, "created_by": MARKER, "settings": settings,
             "layout": {"arch": arch, "skips": [s.as_dict() for s in skips]}}
    if link is not None:
        attrs["from_study"] = link
    component = {"output_type": "artifact", "artifact_key": GRID_ATTR}
    created = _create_or_wait(storage, name, attrs, system_attrs={_PREFERENTIAL: True, _N_GENERATE: show,
                                                                  _COMPONENT: component})
    study_id = storage.get_study_id_from_name(name)
    if not created:
        found = storage.get_study_user_attrs(study_id)
        if not is_eye(found):
            raise StudyError(f"study {name!r} is a FID study, not one judged by eye: it is left untouched; give the "
                             f"eye study another name (a FID study's best trials become candidates with from_study)",
                             option="study")
        _check_settings(name, found, settings, weights, task.model)
        if link is not None and found.get("from_study") != link:
            was = found.get("from_study")
            raise StudyError(f"study {name!r} was started {'from ' + repr(was) if was else 'without a FID study'}, "
                             f"not from {link}; resume it as it was started, or use another study name",
                             option="study")
    system = storage.get_study_system_attrs(study_id)
    for key, value in {_PREFERENTIAL: True, _N_GENERATE: show, _COMPONENT: component}.items():
        if system.get(key) != value:  # the set's size may change between runs; the marks of a half-made study
            storage.set_study_system_attr(study_id, key, value)
    study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    if not created:
        study.sampler.reseed_rng()  # the same seed would propose the same first random points again
    _fail_half_rendered(study)
    _queue_first(study, space, skips, source, top)
    if source is not None:
        linked = sorted({*source.user_attrs.get("eye_studies", []), name})
        if linked != source.user_attrs.get("eye_studies"):
            source.set_user_attr("eye_studies", linked)
    return PreferentialStudy(study)


def _check_source(source: optuna.Study, space: Space, top: int) -> dict:
    """A FID study of this tool with at least one completed trial and this very space."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top = {top!r}: the number of a FID study's best trials to compare is at least 1",
                         option="top")
    if not is_own(source.user_attrs, source.directions) or is_eye(source.user_attrs):
        raise StudyError(f"study {source.study_name!r} is not a FID study of skiptune-search; give the study a "
                         f"search ran", option="from_study")
    if study_space(source).as_dict() != space.as_dict():
        raise StudyError(f"study {source.study_name!r} searched another space than the eye study's; take the eye "
                         f"study's family and settings from it", option="from_study")
    if not source.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise StudyError(f"study {source.study_name!r} has no completed trial yet; run its search first",
                         option="from_study")
    return {"study": source.study_name, "top": top}


def best_of(source: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` best completed trials of a FID study, lowest value first: not its first trials
    (the untuned model, preset and ramp are candidates anyway), and no two that sample the same images."""
    complete = sorted(source.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                      key=lambda t: t.value)
    picked, keys = [], set()
    for t in complete:
        key = t.user_attrs.get("calls_key") or repr(sorted(t.params.items()))
        if any(t.user_attrs.get(m) for m in first_marks()) or "same_as" in t.user_attrs or key in keys:
            continue
        keys.add(key)
        picked.append(t)
        if len(picked) == top:
            break
    return picked


def _queue_first(study: optuna.Study, space: Space, skips, source: optuna.Study | None, top: int) -> None:
    """Queue each first candidate and (mixed mode) each of the FID study's best that the study
    does not hold yet (failed ones are queued again)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    queue = [(params, space.marks(attr)) for attr, params in space.first_trials(skips, "tpe")
             if not any(t.user_attrs.get(attr) for t in trials)]
    for best in best_of(source, top) if source is not None else ():
        mark = {"study": source.study_name, "trial": best.number, "value": best.value}
        if not any(t.user_attrs.get("fid_trial") == mark for t in trials):
            queue.append((best.params, {"fid_trial": mark}))
    # in an order of the study's own: the dashboard names a candidate by its trial number, and the
    # untuned model should not always be trial 0
    random.Random(study.study_name).shuffle(queue)
    for params, marks in queue:
        study.enqueue_trial(params, user_attrs=marks)


def _fail_half_rendered(study: optuna.Study) -> list[int]:
    """Fail the candidates a dead process of this host left without a grid (killed while it
    rendered): the dashboard could never show them. One with its grid stays a candidate."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if GRID_ATTR not in t.user_attrs and _process_gone(t.user_attrs.get("worker")):
            try:
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            failed.append(t.number)
    return failed


def study_page(pstudy) -> str:
    """The path of the study's page in optuna-dashboard (its preferential view: the sets to judge)."""
    return f"dashboard/studies/{getattr(pstudy, '_study', pstudy)._study_id}"  # noqa: SLF001


# --- choices ------------------------------------------------------------------------------------------
def _system_attrs(study) -> dict:
    study = getattr(study, "_study", study)  # a PreferentialStudy holds its optuna.Study
    return study._storage.get_study_system_attrs(study._study_id)  # noqa: SLF001


def choices(study) -> int:
    """The choices recorded: one per set in which a person marked the worst (or per preference
    reported through the API), not counting those undone in the dashboard."""
    return sum(1 for k, v in _system_attrs(study).items() if k.startswith(_PREFERENCE_PREFIX) and v)


def preferences(study) -> list[tuple[int, int]]:
    """Every recorded (better, worse) pair of trial numbers, undone choices left out."""
    return [tuple(p) for k, v in _system_attrs(study).items() if k.startswith(_PREFERENCE_PREFIX) for p in v]


def bradley_terry(pairs: list[tuple[int, int]], prior: float = 0.1) -> dict[int, float]:
    """A score per trial from (better, worse) pairs: the Bradley-Terry model's maximum a posteriori
    (P(a beats b) = sigmoid(s_a - s_b), a Gaussian prior of precision ``prior`` on each s). A
    candidate that beat a strong one gains more than one that beat a weak one."""
    from scipy.optimize import minimize

    numbers = sorted({n for pair in pairs for n in pair})
    index = {n: i for i, n in enumerate(numbers)}
    better = np.array([index[b] for b, _ in pairs])
    worse = np.array([index[w] for _, w in pairs])

    def loss(s):
        d = s[better] - s[worse]
        p = 1 / (1 + np.exp(d))  # P(the recorded order is wrong)
        grad = prior * s
        np.add.at(grad, better, -p)
        np.add.at(grad, worse, p)
        return float(np.logaddexp(0, -d).sum() + prior / 2 * s @ s), grad

    s = minimize(loss, np.zeros(len(numbers)), jac=True, method="L-BFGS-B").x
    return {n: float(s[index[n]]) for n in numbers}


@storage_faults
def preferred_trial(study) -> tuple[optuna.trial.FrozenTrial, int]:
    """The most preferred candidate and the number of choices behind it: among the compared
    candidates never marked worst (nor skipped), the highest Bradley-Terry score over every
    recorded pair (``bradley_terry``; the later trial on a tie)."""
    study = getattr(study, "_study", study)
    pairs = preferences(study)
    if not pairs:
        raise StudyError(f"study {study.study_name!r} has no recorded choice yet: mark the worst grid of a set in "
                         f"optuna-dashboard first")
    system = _system_attrs(study)
    skipped = {int(k[len(_SKIP_PREFIX):]) for k in system if k.startswith(_SKIP_PREFIX)}
    trials = study.get_trials(deepcopy=False)
    scores = bradley_terry(pairs)
    worse = {w for _, w in pairs}
    kept = [n for n in scores if trials[n]._trial_id not in skipped]  # noqa: SLF001
    pool = [n for n in kept if n not in worse] or kept or list(scores)
    best = max(pool, key=lambda n: (scores[n], n))
    return trials[best], choices(study)


def preferred_schedule(study, storage_url: str) -> RhoSchedule:
    """The most preferred candidate of an eye study (or its ``PreferentialStudy``) as a schedule;
    its metric says it was chosen by eye, with the number of choices and the grid's samples and seeds."""
    study = getattr(study, "_study", study)
    best, made = preferred_trial(study)
    task = with_legacy_defaults(study_settings(study)["task"])
    arch, skips = study_layout(study)
    return study_space(study).schedule(
        arch, skips, best.params, tuned_for=tuned_for(task),
        metric={"name": "eye", "comparisons": made, "n": task["n"],
                "seeds": f"{task['seed']}-{task['seed'] + task['n'] - 1}"},
        source={"study": study.study_name, "trial": best.number, "storage": shown_url(storage_url)})


# --- the loop -----------------------------------------------------------------------------------------
def render(evaluator, schedule: RhoSchedule):
    """One candidate's grid: the task's seeds (and prompts), sampled with ``schedule``."""
    return evaluator.images(schedule, seeds=evaluator.task.seeds, progress=False)


def propose(pstudy, space: Space, evaluator, store) -> optuna.trial.FrozenTrial:
    """Ask the study for the next candidate (a queued first one, else the sampler's), render its
    grid and upload it; the trial stays RUNNING, as a candidate of optuna-dashboard's preferential
    UI (a choice completes it). A candidate interrupted while it renders is failed; one with
    non-finite samples too, its reason recorded, and NonFiniteSamplesError raised."""
    ctl = evaluator.controller
    trial = pstudy.ask()
    fail = lambda: pstudy._study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: E731,SLF001
    try:
        trial.set_user_attr("worker", worker_id())
        params, placement = space.suggest(trial, ctl.skips)
        schedule = space.schedule(ctl.arch, ctl.skips, {**params, "placement": placement})
        trial.set_user_attr("rho", schedule.rho)
        if schedule.freeu is not None:
            trial.set_user_attr("freeu", schedule.freeu.as_json())
        if (key := calls_key(schedule, evaluator.call_sigmas, ctl.hidden_channels())) is not None:
            trial.set_user_attr("calls_key", key)
        with interrupts.immediate():  # sampling: where Ctrl-C acts at once
            images = render(evaluator, schedule)
        side = max(1, round(math.sqrt(len(images))))
        trial.set_user_attr(GRID_ATTR, upload_grid(store, trial, images, nrow=side))
    except NonFiniteSamplesError as exc:
        trial.set_user_attr("fail_reason", str(exc))
        fail()
        raise
    except BaseException:
        fail()
        raise
    return pstudy._study._storage.get_trial(trial._trial_id)  # noqa: SLF001


@storage_faults
def run_eye(evaluator, pstudy, space: Space, target: int, artifacts: Path,
            on_candidate: Callable[[optuna.trial.FrozenTrial], None] | None = None,
            on_choice: Callable[[int], None] | None = None, poll: float = 0.5,
            timeout: float | None = None) -> int:
    """Propose candidates while the dashboard shows fewer than the study's set size, and wait for
    choices, until the study holds ``target`` choices (a resumed study counts those it has), a
    signal stops it (KeyboardInterrupt; every choice and shown candidate is kept), or ``timeout``
    seconds pass. Returns the number of choices."""
    from optuna.artifacts import FileSystemArtifactStore

    artifacts.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifacts))
    start, failed_in_a_row = time.monotonic(), 0
    made = choices(pstudy)
    with interrupts.deferred():  # Ctrl-C acts while a grid renders, or here between steps
        while made < target and (timeout is None or time.monotonic() - start < timeout):
            interrupts.check()
            if pstudy.should_generate():
                try:
                    trial = propose(pstudy, space, evaluator, store)
                except NonFiniteSamplesError:
                    failed_in_a_row += 1
                    if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                        raise
                    continue
                failed_in_a_row = 0
                if on_candidate:
                    on_candidate(trial)
            else:
                time.sleep(poll)
            if (now := choices(pstudy)) != made:
                made = now
                if on_choice:
                    on_choice(made)
        interrupts.check()
    return made

