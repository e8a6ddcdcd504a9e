"""Studies of this tool: create or resume one (checked against its task, space and weights), tell
them from anyone else's, recover trials a dead process left running, and export the best.

A study is this tool's when it minimizes one value and carries the settings and skip layout this
tool writes (studies made since 0.2 also carry ``created_by``). Anything else in the same storage
is refused before a single write, and listed as foreign.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import optuna

from ..core.errors import StudyError
from ..core.schedule import RhoSchedule, SkipInfo
from ..models.loaders import DEFAULT_MODEL_NAME, weights_fingerprint
from ..scoring.task import Task, default_sigma_grid, with_legacy_defaults
from . import default_optimizer
from .optimizers import LEGACY_OPTIMIZER, LEGACY_REDUCTION_FACTOR, default_reduction_factor, make_pruner, make_sampler
from .space import Space, mark_attrs
from .storage import shown_url, storage_faults

MARKER = "skiptune-search"  # the created_by attribute of this tool's studies
NAME_CHARS = "letters, digits and . _ - (at most 128)"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_study_name(name: str) -> str:
    """A study name of letters, digits, '.', '_' and '-', at most 128 long, not starting with '.':
    it names files (the exported schedule), so it must stay inside its folder."""
    if not name or len(name) > 128 or not set(name) <= _NAME_OK or name.startswith("."):
        raise StudyError(f"study name {name!r} is not allowed: use {NAME_CHARS}, not starting with '.'",
                         option="study")
    return name


def default_study_name(task: Task, space: Space) -> str:
    model = Path(task.model).name if task.model != DEFAULT_MODEL_NAME else task.model
    model = "".join(c if c in _NAME_OK else "_" for c in model).lstrip(".")[:60] or "model"
    grid = "" if task.sigma_grid == default_sigma_grid(task.sampler) else f"-{task.sigma_grid}grid"
    cfg = f"-cfg{task.guidance:g}" if task.prompts is not None else ""
    size = f"-{task.width or 'auto'}x{task.height or 'auto'}" if task.height or task.width else ""
    window = "" if space.freeu_window or not space.with_freeu else "-allsteps"
    variant = f"-{space.freeu_variant}" if space.with_freeu and space.freeu_variant != "v1-stages" else ""
    return (f"{model}-{task.sampler}{grid}-nfe{task.nfe}{cfg}{size}-{space.family}{variant}{window}-"
            f"{space.placement}")


# --- whose study is it ------------------------------------------------------------------------
def is_own(user_attrs: dict, directions) -> bool:
    """Made by this tool: one minimized value, and its settings and skip layout."""
    settings, layout = user_attrs.get("settings"), user_attrs.get("layout")
    return (len(directions) == 1 and directions[0] == optuna.study.StudyDirection.MINIMIZE
            and isinstance(settings, dict) and isinstance(settings.get("task"), dict)
            and isinstance(layout, dict) and "skips" in layout)


def is_eye(user_attrs: dict) -> bool:
    """A study judged by eye (``search.eye``: a preferential study of optuna-dashboard), not by FID."""
    settings = user_attrs.get("settings")
    return isinstance(settings, dict) and settings.get("judge") == "eye"


def _foreign(name: str) -> StudyError:
    return StudyError(f"study {name!r} was not made by skiptune-search (or was made for another purpose): it is "
                      f"left untouched; use another study name", option="study")


@storage_faults
def load_own_study(storage: optuna.storages.BaseStorage, name: str, where: str) -> optuna.Study:
    """An existing study of this tool, or a one-line error (missing, or someone else's)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        raise StudyError(f"no study {name!r} in {where}; list them with 'skiptune-search studies'",
                         option="study") from None
    if not is_own(storage.get_study_user_attrs(study_id), storage.get_study_directions(study_id)):
        raise _foreign(name)
    return optuna.load_study(study_name=name, storage=storage)


@storage_faults
def open_study(storage: optuna.storages.BaseStorage, name: str, task: Task, space: Space, controller,
               seed: int, optimizer: str | None = "tpe", parallel: bool = False, warm_start: bool = True,
               reduction_factor: int | None = None) -> optuna.Study:
    """Create the study, or load it and check it is this tool's and was run with the same task,
    space and weights (of ``controller``'s model: its ``arch``, ``skips`` and ``unet``); nothing
    is written to a study that fails a check. Trials a dead process
    left running are failed and queued again, and the first trials (ρ = 1 baseline, paper-style
    ramp) are queued where they are neither finished nor pending.

    ``seed`` makes a new study's search reproducible. A study resumed, or shared by ``parallel``
    workers, reseeds its optimizer from the system instead: with the same seed it would propose
    the points it proposed before (all of them, for random search).

    ``warm_start``: a new study queues, right after the untuned baseline, the best trial of each
    study of this tool in the same storage that differs from it only in the NFE (``siblings``),
    its parameters carried over to this space and marked ``warm_start``.

    ``reduction_factor``: a new study's successive halving, recorded in it (None: its optimizer's,
    ``default_reduction_factor``); a resumed study keeps the one it was created with
    (``reduction_factor_of``).

    ``optimizer``: a new study's, recorded in it (None: the method's default, ``default_optimizer``);
    a resumed study keeps its own (``optimizer_of``): None resumes with it, another is refused."""
    check_study_name(name)
    space.check(controller.skips)
    arch, skips, weights = controller.arch, controller.skips, weights_fingerprint(controller.unet)
    settings = json.loads(json.dumps({"task": task.scoring_key(), **space.as_dict()}))
    chosen = optimizer or default_optimizer(space.family, space.freeu_window, space.placement)
    reduction_factor = default_reduction_factor(chosen) if reduction_factor is None else reduction_factor
    created = _create_or_wait(storage, name, {"weights": weights, "created_by": MARKER, "settings": settings,
                                              "reduction_factor": reduction_factor, "optimizer": chosen,
                                              "layout": {"arch": arch, "skips": [s.as_dict() for s in skips]}})
    if not created:
        study_id = storage.get_study_id_from_name(name)
        attrs = storage.get_study_user_attrs(study_id)
        if is_eye(attrs):
            raise StudyError(f"study {name!r} is judged by eye (a preferential study), not by FID: it is left "
                             f"untouched; give this search another study name", option="study")
        _check_settings(name, attrs, settings, weights, task.model)
        if "weights" not in attrs:  # a study from before weights were recorded
            storage.set_study_user_attr(study_id, "weights", weights)
        reduction_factor = reduction_factor_of(attrs)  # the pruner it was created with
        if "optimizer" not in attrs:  # a study from before optimizers were recorded: the one named, or TPE
            chosen = optimizer or optimizer_of(attrs)
            storage.set_study_user_attr(study_id, "optimizer", chosen)
        else:  # the optimizer it was made with: a default that changed since leaves it alone
            chosen = optimizer_of(attrs)
            if optimizer and optimizer != chosen:
                raise StudyError(f"study {name!r} searches with {chosen}, the optimizer it was made with: resume "
                                 f"it without an optimizer (or with {chosen}), or search with {optimizer} in a "
                                 f"study of another name", option="optimizer")
    study = optuna.load_study(storage=storage, study_name=name, sampler=make_sampler(chosen, space, skips, seed),
                              pruner=make_pruner(task.rungs, reduction_factor))
    if parallel or not created:
        study.sampler.reseed_rng()
    recover_dead_trials(study)
    trials = study.get_trials(deepcopy=False)
    pending = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for k, (attr, params) in enumerate(space.first_trials(skips, chosen)):
        if not any(t.user_attrs.get(attr) and (is_finished(t) or t.state in pending) for t in trials):
            study.enqueue_trial(params, user_attrs=space.marks(attr))
        if k == 0 and created and warm_start:
            for params, mark in warm_starts(study, space, skips):
                study.enqueue_trial(params, user_attrs={"warm_start": mark})
    return study


def optimizer_of(user_attrs: dict) -> str:
    """The optimizer a study searches with (one from before it was recorded: TPE, every search's
    default then)."""
    return user_attrs.get("optimizer", LEGACY_OPTIMIZER)


def reduction_factor_of(user_attrs: dict) -> int:
    """The successive halving factor a study was created with (one from before it was recorded: 3)."""
    return user_attrs.get("reduction_factor", LEGACY_REDUCTION_FACTOR)


def queued_warm_starts(study: optuna.Study) -> list[dict]:
    """The marks of the warm starts still waiting to run."""
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return [t.user_attrs["warm_start"] for t in waiting if t.user_attrs.get("warm_start")]


def siblings_key(user_attrs: dict) -> tuple:
    """What studies of one model, sampler, family... at several NFEs share: every setting but the NFE
    and what follows from the σ grid (per_noise's knots, FreeU's σ range and model calls)."""
    settings = user_attrs.get("settings", {})
    task = {k: v for k, v in with_legacy_defaults(settings.get("task", {})).items() if k != "nfe"}
    space = {k: v for k, v in settings.items() if k not in ("task", "sigma_knots", "sigma_range", "call_sigmas")}
    return json.dumps(task, sort_keys=True), json.dumps(space, sort_keys=True), user_attrs.get("weights")


def siblings(study: optuna.Study) -> list[optuna.Study]:
    """The other studies of this tool in ``study``'s storage with the same ``siblings_key``."""
    key, found = siblings_key(study.user_attrs), []
    for summary in optuna.get_all_study_summaries(study._storage, include_best_trial=False):
        if summary.study_name == study.study_name:
            continue
        other = optuna.load_study(study_name=summary.study_name, storage=study._storage)
        if is_own(other.user_attrs, other.directions) and siblings_key(other.user_attrs) == key:
            found.append(other)
    return found


def warm_starts(study: optuna.Study, space: Space, skips: list[SkipInfo]) -> list[tuple[dict, dict]]:
    """(parameters, mark) of each sibling study's best completed trial, carried over to ``space``:
    none that is its untuned baseline, doesn't fit, or repeats another."""
    starts: list[tuple[dict, dict]] = []
    nfe_of = lambda s: s.user_attrs["settings"]["task"]["nfe"]  # noqa: E731
    for other in sorted((o for o in siblings(study) if nfe_of(o) != nfe_of(study)), key=nfe_of):
        complete = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            continue
        best = min(complete, key=lambda t: t.value)
        params = None if best.user_attrs.get("baseline") else space.carried(study_space(other), best.params, skips)
        if params is not None and all(params != p for p, _ in starts):
            starts.append((params, {"study": other.study_name, "nfe": nfe_of(other),
                                    "trial": best.number, "value": best.value}))
    return starts


def _create_or_wait(storage: optuna.storages.BaseStorage, name: str, attrs: dict, wait_s: float = 20.0,
                    system_attrs: dict | None = None) -> bool:
    """Create the study with ``attrs`` (True), or find it existing and return False once it is this
    tool's. Creating a study and writing its attributes are separate writes: ``created_by`` goes
    first and ``layout`` (which makes a study this tool's) last, so a study found with a part of
    ``attrs`` and no trials may be one another process is creating this very moment. It is waited
    for while its attributes keep coming (``wait_s`` after the last one). One that stops short with
    this tool's mark was left half-made by a process that died creating it: with the same values it
    is completed and used, with others refused; any other study is someone else's. A new study
    gets ``system_attrs`` (optuna-dashboard's marks of a preferential study) before any of ``attrs``."""
    try:
        study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
    except optuna.exceptions.DuplicatedStudyError:
        study_id = None
    if study_id is not None:
        for key, value in (system_attrs or {}).items():
            storage.set_study_system_attr(study_id, key, value)
        for key in sorted(attrs, key=lambda k: (k != "created_by", k == "layout")):
            storage.set_study_user_attr(study_id, key, attrs[key])
        return True
    study_id = storage.get_study_id_from_name(name)
    deadline, seen = time.monotonic() + wait_s, None
    while True:
        found, directions = storage.get_study_user_attrs(study_id), storage.get_study_directions(study_id)
        if is_own(found, directions):
            return False
        being_born = (set(found) <= set(attrs) and found.get("created_by", MARKER) == MARKER
                      and list(directions) == [optuna.study.StudyDirection.MINIMIZE]
                      and not storage.get_all_trials(study_id, deepcopy=False))
        if not being_born:
            raise _foreign(name)
        if set(found) != seen:  # another process is still writing them
            deadline, seen = time.monotonic() + wait_s, set(found)
        elif time.monotonic() > deadline:
            if found.get("created_by") != MARKER:
                raise _foreign(name)
            if any(json.dumps(found[k], sort_keys=True) != json.dumps(attrs[k], sort_keys=True) for k in found):
                raise StudyError(f"study {name!r} was left half-made by a search that stopped while creating it, for "
                                 f"other settings or weights; use another study name, or delete that study with Optuna's "
                                 f"delete-study command on the same storage", option="study")
            for key in sorted(set(attrs) - set(found), key=lambda k: k == "layout"):  # ours, half-made: finish it
                storage.set_study_user_attr(study_id, key, attrs[key])
            return False
        time.sleep(0.2)


def memory_study(space: Space, skips: list[SkipInfo], optimizer: str, seed: int, rungs,
                 reduction_factor: int | None = None, min_resource: int | None = None) -> optuna.Study:
    """A study in memory with the search's optimizer, pruner (``make_pruner``, with ``optimizer``'s
    factor where ``reduction_factor`` is None) and first trials: what
    the benchmarks replay a search on (Optuna's own log set to warnings, as ``make_storage`` does)."""
    space.check(skips)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(optimizer, space, skips, seed),
                                pruner=make_pruner(rungs, default_reduction_factor(optimizer) if reduction_factor is None
                                                   else reduction_factor,
                                                   min_resource))
    for attr, params in space.first_trials(skips, optimizer):
        study.enqueue_trial(params, user_attrs=space.marks(attr))
    return study


def _check_settings(name: str, attrs: dict, settings: dict, weights: str, model: str) -> None:
    old = {**attrs["settings"], "task": with_legacy_defaults(attrs["settings"]["task"])}
    if old != settings:
        flat_old, flat_new = _flatten(old), _flatten(settings)
        diff = [f"{k}: {flat_old.get(k)} (now {v})" for k, v in flat_new.items() if flat_old.get(k) != v]
        raise StudyError(f"study {name!r} exists with other settings ({'; '.join(diff)}); use the same settings to "
                         f"resume it, or another study name", option="study")
    stored = attrs.get("weights")
    if stored is not None and stored != weights:  # the same model path with other weights: retrained in place
        raise StudyError(f"study {name!r} was run with other weights of {model} (retrained, or loaded in another "
                         f"precision), so its FIDs do not compare with this model's; use another study name",
                         option="study")


def _flatten(settings: dict) -> dict:
    """{'task': {'n': 1}, 'family': 'linear'} -> {'n': 1, 'family': 'linear'}."""
    flat = dict(settings.get("task", {}))
    flat.update({k: v for k, v in settings.items() if k != "task"})
    return flat


def study_settings(study: optuna.Study) -> dict:
    """The task and space a study was run with; a one-line error for a study of another tool."""
    if not is_own(study.user_attrs, study.directions):
        raise _foreign(study.study_name)
    return study.user_attrs["settings"]


def study_space(study: optuna.Study) -> Space:
    s = study_settings(study)
    return Space(s["family"], s["placement"], tuple(s["rho_range"]), tuple(s.get("sigma_knots", ())), s.get("step"),
                 tuple(s.get("sigma_range", ())), s.get("freeu_model"), s.get("freeu_window", True),
                 tuple(s.get("call_sigmas", ())), s.get("freeu_variant", "v1-stages"))


def study_layout(study: optuna.Study) -> tuple[str, list[SkipInfo]]:
    study_settings(study)
    layout = study.user_attrs["layout"]
    return layout["arch"], [SkipInfo(**s) for s in layout["skips"]]


# --- trials: finished, dead, recovered -------------------------------------------------------------
def worker_id() -> dict:
    """Who runs a trial: this host and process (stored on the trial, so a later run on the same host
    can tell a trial whose process died from one still running)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_gone(worker: dict | None) -> bool:
    if not worker or worker.get("host") != socket.gethostname():
        return False  # another machine's: its heartbeat tells
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, ValueError, TypeError):
        return False
    return int(worker["pid"]) == os.getpid()  # a trial of this very process, which runs none yet: left by a reused pid


def recover_dead_trials(study: optuna.Study, own: bool = False) -> list[int]:
    """Fail every RUNNING trial whose process is gone (killed, out of disk, machine lost) and queue
    its parameters again, with its baseline or ramp mark: on this host at once, by its process id;
    elsewhere once its heartbeat is stale (Optuna's own retry queues those). With ``own``, this
    process's own RUNNING trials instead (a search stopped by a storage fault leaves none running).
    Returns the numbers of the trials failed here."""
    if not own:
        with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna's words
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    failed = []
    storage = study._storage  # noqa: SLF001 - Optuna's own way to fail a trial it did not run
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not (trial.user_attrs.get("worker") == worker_id() if own else _process_gone(trial.user_attrs.get("worker"))):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first
        marks = {k: trial.user_attrs[k] for k in mark_attrs() if trial.user_attrs.get(k)}
        # a queued trial killed before it suggested anything holds its parameters as fixed ones only
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        study.enqueue_trial(params, user_attrs={**marks, "retry_of": trial.number})
        failed.append(trial.number)
    return failed


@storage_faults
def study_rows(storage: optuna.storages.BaseStorage) -> list[dict]:
    """One row per study of the storage, by name: this tool's with their trial counts (done,
    running, pruned, failed; surplus trials of concurrent runs are not failures), baseline and
    best values and optimizer (None for one judged by eye); other tools' studies as
    ``{"name": ..., "foreign": True}``, never read further."""
    rows = []
    states = optuna.trial.TrialState
    for summary in sorted(optuna.get_all_study_summaries(storage, include_best_trial=False),
                          key=lambda s: s.study_name):
        if not is_own(summary.user_attrs, summary.directions):
            rows.append({"name": summary.study_name, "foreign": True})
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        count = {s.name.lower(): sum(t.state == s and not t.user_attrs.get("surplus") for t in trials) for s in states}
        base = getattr(baseline_trial(study), "value", None)
        best = min((t.value for t in trials if t.state == states.COMPLETE), default=None)
        optimizer = optimizer_of(summary.user_attrs)
        if is_eye(summary.user_attrs):  # its trials' values are optuna-dashboard's placeholders, not scores
            base = best = optimizer = None  # and optuna-dashboard's preferential sampler proposes
        rows.append({"name": summary.study_name, "foreign": False, **count, "baseline": base, "best": best,
                     "optimizer": optimizer})
    return rows


def is_finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Completed, pruned, or failed for a reason of its own (NaN samples); not one interrupted or
    whose process died (those are retried)."""
    return (trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            or (trial.state == optuna.trial.TrialState.FAIL and "fail_reason" in trial.user_attrs))


def finished_trials(study: optuna.Study) -> int:
    return sum(map(is_finished, study.get_trials(deepcopy=False)))


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("baseline"):
            return t
    return None


def params_at_edge(params: dict, rho_range: tuple[float, float], margin: float = 0.02) -> list[str]:
    """The ρ parameters of ``params`` (named rho_...) within ``margin`` of the range's width of one
    of its bounds, as 'name = value': an optimum there may lie outside the searched range."""
    lo, hi = rho_range
    edge = margin * (hi - lo)
    return [f"{k} = {v:.3f}" for k, v in params.items()
            if k.startswith("rho") and isinstance(v, float) and (v - lo <= edge or hi - v <= edge)]


# --- export -------------------------------------------------------------------------------------
@storage_faults
def export_best(study: optuna.Study, storage_url: str) -> RhoSchedule:
    """The best completed trial of ``study`` as a schedule, with where it came from (a study judged
    by eye exports its most preferred candidate instead: ``eye.preferred_schedule``)."""
    settings = study_settings(study)
    if is_eye(study.user_attrs):
        raise StudyError(f"study {study.study_name!r} was judged by eye: it has a most preferred candidate, not a "
                         f"best value (eye.preferred_schedule)")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise StudyError(f"study {study.study_name!r} has no completed trial yet; run its search first")
    best = min(complete, key=lambda t: t.value)
    task = with_legacy_defaults(settings["task"])
    arch, skips = study_layout(study)
    base = baseline_trial(study)
    return study_space(study).schedule(
        arch, skips, best.params,
        tuned_for=tuned_for(task),
        metric={"name": task.get("objective", "fid"), "features": task["features"], "n": task["n"],
                "seeds": f"{task['seed']}-{task['seed'] + task['n'] - 1}", "value": best.value,
                "baseline": base.value if base else None},
        source={"study": study.study_name, "trial": best.number, "storage": shown_url(storage_url)},
    )


def tuned_for(task: dict) -> dict:
    """A schedule's ``tuned_for`` from a study's task settings: model, sampler, NFE, σ grid and
    precision; a text model's prompts and guidance, and its image size where set."""
    out = {"model": task["model"], "sampler": task["sampler"], "nfe": task["nfe"],
           "sigma_grid": task["sigma_grid"], "precision": task["precision"]}
    if task["prompts"] is not None:
        out.update(prompts=task["prompts"], guidance=task["guidance"])
    out.update({k: task[k] for k in ("height", "width") if task[k] is not None})
    return out
