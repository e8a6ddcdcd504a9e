"""A search from start to export, in one place for the CLI and for Python.

``prepare`` turns an evaluator (a task's model, ready to score) and the search settings into a
space and an opened study; ``run`` is a whole search (checks, study, workers, export: the
command line's ``search`` only gathers its options and calls it); ``tune`` is ``run`` for a model
and sampling loop of your own:

>>> from skiptune_search.search.tune import tune
>>> best = tune(unet, my_sample, name="my-unet", reference="ref.npz", trials=16)   # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import optuna
import torch

from ..core import freeu
from ..core.errors import InputError, ScheduleError, StudyError
from ..core.files import check_output
from ..core.limits import (
    MAX_BATCH, MAX_KNOTS, MAX_N, MAX_SEARCH_SEED, MAX_TRIALS, MIN_KNOTS, check_float, check_int, check_rho_range,
)
from ..core.families import family as family_of
from ..core.families import family_names
from ..core.schedule import PLACEMENTS, RhoSchedule
from ..models.source import ModelSource
from ..scoring import DEFAULT_FEATURES
from ..scoring.evaluator import Evaluator, OwnModel, SampleFn, check_bundled_reference
from ..scoring.metrics import reference_inputs
from ..scoring.objectives import objective_label
from ..scoring.task import CUSTOM, Task, default_rungs
from . import DEFAULT_STORAGE, OPTIMIZERS
from .objective import run_search
from .space import Space, log_spaced_knots
from .storage import artifact_dir, make_storage, shown_url
from .study import check_study_name, default_study_name, export_best, open_study


def prepare(evaluator: Evaluator, storage: str, *, family: str = "linear", placement: str = "input",
            rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3, freeu_window: bool = True,
            study: str | None = None, heartbeat: int | None = 60, search_seed: int = 0, optimizer: str | None = None,
            parallel: bool = False, warm_start: bool = True,
            freeu_variant: str = "v1-stages") -> tuple[Space, optuna.Study]:
    """The search space (σ knots of per_noise, and FreeU's σ window, over the sampler's σ range) and
    the study (created, or resumed after its settings are checked; named after the task unless given;
    a new one warm-started from the same search's studies at other NFEs unless ``warm_start`` is off;
    ``optimizer`` None: a resumed study's own, a new one's the family's default, ``default_optimizer``)."""
    ctl = evaluator.controller
    if placement != "search":
        ctl.check_placement(placement)  # before any trial: a placement the architecture cannot take
    elif ctl.placements == ("input",):
        raise ScheduleError(f"a searched placement picks among input, normalized and both, but {ctl.arch} has no "
                            f"normalization at the decoder input, so only input applies: use placement input",
                            option="placement")
    space = make_space(evaluator, family, placement, rho_range, knots, freeu_window, freeu_variant)
    name = check_study_name(study) if study else study_name(evaluator.task, space)
    opened = open_study(make_storage(storage, heartbeat), name, evaluator.task, space, evaluator.controller,
                        search_seed, optimizer, parallel, warm_start)
    return space, opened


def study_name(task: Task, space: Space) -> str:
    """A study's name when none is given: MODEL-SAMPLER-nfeNFE-FAMILY-PLACEMENT
    (``study.default_study_name``); for a model of your own (sampler ``CUSTOM``) NAME-FAMILY-PLACEMENT,
    with the FreeU variant and -allsteps (no window) as they apply."""
    if task.sampler != CUSTOM:
        return default_study_name(task, space)
    variant = "" if space.freeu_variant == "v1-stages" or not space.with_freeu else f"-{space.freeu_variant}"
    window = "" if space.freeu_window or not space.with_freeu else "-allsteps"
    return f"{check_study_name(task.model)}-{space.family}{variant}{window}-{space.placement}"


def check_window_family(family: str, freeu_window: bool, freeu_variant: str = "v1-stages") -> bool:
    """Whether ``family`` comes with FreeU; FreeU at every σ (no window), or another FreeU variant,
    needs one that does."""
    with_freeu = family_of(family).freeu
    freeu_families = ", ".join(name for name in family_names() if family_of(name).freeu)
    if not freeu_window and not with_freeu:
        raise InputError(f"FreeU acting at every σ (no window) needs a FreeU family ({freeu_families}), not "
                         f"{family}", option="family")
    if freeu_variant not in freeu.VARIANTS:
        raise InputError(f"unknown FreeU variant {freeu_variant!r}; choose one of {', '.join(freeu.VARIANTS)}",
                         option="freeu_variant")
    if freeu_variant != "v1-stages" and not with_freeu:
        raise InputError(f"FreeU variant {freeu_variant} needs a FreeU family ({freeu_families}), not {family}",
                         option="freeu_variant")
    return with_freeu


def make_space(evaluator: Evaluator, family: str, placement: str = "input",
               rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3, freeu_window: bool = True,
               freeu_variant: str = "v1-stages") -> Space:
    """A family's search space on the evaluator's model and sampler: the ``knots`` of a family with
    ρ per σ (per_noise) log-spaced over the sampler's σ range; for the FreeU families their σ window over the
    sampler's model calls (over its σ range for your own loop; unless ``freeu_window`` is off:
    FreeU at every σ) and the model family FreeU's preset is picked for; ``freeu_variant`` the
    FreeU function searched (``freeu.VARIANTS``), checked on the model before a study is written."""
    rho_range = check_rho_range(rho_range)
    knots = check_int(knots, "knots", MIN_KNOTS, MAX_KNOTS)
    with_freeu = check_window_family(family, freeu_window, freeu_variant)
    if with_freeu and freeu_variant != "v1-stages":
        ctl = evaluator.controller
        probe = freeu.FreeU(*freeu.PRESETS["SD1.5"], version=freeu.VARIANTS[freeu_variant][0],
                            keyed_by=freeu.VARIANTS[freeu_variant][1])
        try:  # keyed by channel count: does any block of this model have such a backbone?
            freeu.per_skip(probe, ctl.skips, ctl.hidden_channels())
        except ScheduleError as exc:
            raise InputError(f"FreeU {freeu_variant} on {ctl.arch}: {exc}", option="freeu_variant") from None
    per_sigma = family_of(family).per_sigma
    sigma_dependent = per_sigma or (with_freeu and freeu_window)
    try:  # known for every model the CLI loads; for your own loop, needed only where σ matters
        sigma_range = evaluator.sigma_range
    except InputError:
        if sigma_dependent:
            raise
        sigma_range = ()
    if sigma_dependent and not evaluator.controller.knows_sigma:
        raise InputError(f"the {family} family {'has a σ window' if with_freeu else 'sets ρ per σ'}, but the model "
                         f"is called with timesteps and no timestep_to_sigma was given: pass timestep_to_sigma, or "
                         f"the model inside its Precond wrapper" + (", or freeu_window=False" if with_freeu else ""),
                         option="family")
    sigma_knots = log_spaced_knots(*sigma_range, knots) if per_sigma else ()
    freeu_args = (dict(sigma_range=sigma_range, freeu_model=freeu.recognize(evaluator.controller.unet),
                       freeu_window=freeu_window, call_sigmas=evaluator.call_sigmas if freeu_window else (),
                       freeu_variant=freeu_variant) if with_freeu else {})
    return Space(family, placement, tuple(rho_range), sigma_knots, **freeu_args)


def _check_choice(value, name: str, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} = {value!r} is not one of {', '.join(choices)}", option=name)


def _check_path(value, name: str, optional: bool = True) -> None:
    if (value is None and optional) or (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
        return
    raise InputError(f"{name} = {value!r} is not a path (a non-empty string)", option=name)


def check_tune_arguments(args: dict) -> None:
    """``tune``'s arguments, each of its type and in the command line's bounds (``core.limits``),
    before anything loads or is written: one InputError naming the argument. (Those of the task,
    n, nfe, seed, rungs, features, objective, are checked by ``Task``.)"""
    if not isinstance(args["model"], torch.nn.Module):
        raise InputError(f"model is a {type(args['model']).__name__}, not a torch.nn.Module", option="model")
    for name in ("sample", "timestep_to_sigma"):
        if not callable(args[name]) and (name == "sample" or args[name] is not None):
            raise InputError(f"{name} = {args[name]!r} is not callable", option=name)
    for name in ("name", "study"):  # name labels the model in study names
        value = args[name]
        if name == "study" and value is None:
            continue
        try:
            check_study_name(value if isinstance(value, str) else "")
        except StudyError as exc:
            raise InputError(f"{name} = {value!r}: {exc}", option=name) from None
    check_int(args["trials"], "trials", 1, MAX_TRIALS)
    check_int(args["n"], "n", 2, MAX_N)  # before the default rungs are computed from it
    if hasattr(args["rungs"], "__len__") and len(args["rungs"]) == 0:  # not None: no silent default for it
        raise InputError(f"rungs = {args['rungs']!r} is empty; give sample counts ending at n, e.g. (250, 1000), "
                         f"or None for (n // 4, n)", option="rungs")
    check_int(args["knots"], "knots", MIN_KNOTS, MAX_KNOTS)
    check_int(args["search_seed"], "search_seed", 0, MAX_SEARCH_SEED)
    check_int(args["batch_size"], "batch_size", 1, MAX_BATCH)
    _check_choice(args["family"], "family", family_names())
    _check_choice(args["placement"], "placement", (*PLACEMENTS, "search"))
    if args["optimizer"] is not None:  # None: the study's own, or the family's default for a new one
        _check_choice(args["optimizer"], "optimizer", OPTIMIZERS)
    check_rho_range(args["rho_range"])
    if args["sigma_range"] is not None:
        sigma_range = args["sigma_range"]
        if isinstance(sigma_range, (str, bytes)) or not hasattr(sigma_range, "__len__") or len(sigma_range) != 2:
            raise InputError(f"sigma_range = {sigma_range!r} is not a pair (σ_min, σ_max)", option="sigma_range")
        low, high = (check_float(v, "sigma_range", 0, low_open=True) for v in sigma_range)
        if not low < high:
            raise InputError(f"sigma_range = ({low:g}, {high:g}): σ_min must be below σ_max", option="sigma_range")
    for name in ("freeu_window", "progress", "warm_start"):
        if not isinstance(args[name], bool):
            raise InputError(f"{name} = {args[name]!r} is not True or False", option=name)
    if not isinstance(args["storage"], str) or not args["storage"]:
        raise InputError(f"storage = {args['storage']!r} is not a storage URL (e.g. {DEFAULT_STORAGE})",
                         option="storage")
    _check_path(args["feature_weights"], "feature_weights")
    _check_path(args["out"], "out")


@dataclass
class Outcome:
    """What a search ended with: its study and space, the task, the exported best schedule, the
    baseline trial (None when unfinished) and where the schedule was written (None: nowhere)."""

    study: optuna.Study
    space: Space
    task: Task
    best: RhoSchedule
    baseline: optuna.trial.FrozenTrial | None
    out: Path | None


def run(task: dict, source: ModelSource | OwnModel | None = None, *, storage: str = DEFAULT_STORAGE,
        study: str | None = None, family: str = "linear", placement: str = "input",
        rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3, freeu_window: bool = True,
        freeu_variant: str = "v1-stages", optimizer: str | None = None, search_seed: int = 0, warm_start: bool = True,
        heartbeat: int | None = 60, trials: int = 16, timeout: float | None = None, workers: int = 1,
        threads: int = 0, batch_size: int = 250, feature_weights: str | None = None, device: str = "auto",
        out: str | os.PathLike | None = None, default_out: bool = True, read: Sequence[tuple] = (),
        say: Callable[[str], None] | None = None, progress: bool | None = None,
        check_loop: bool = False) -> Outcome:
    """A whole search, the one composition root of the CLI's ``search`` and of ``tune``: check the
    settings and outputs before the model loads, build the task (``task``: Task's fields; rungs
    None for (N/8, N)) and its evaluator on ``source`` (default: the task's model by name), open
    or resume the study (named after the task unless ``study`` is given; ``optimizer`` None: a
    resumed study's own, a new one's the family's default, ``default_optimizer``), run the trials here and
    in ``workers - 1`` worker processes (``workers.start``, loading while this one loads, then
    ``workers.assign``; stopped with this one), export the best
    schedule to ``out`` (default, with ``default_out``: studies/STUDY.best.json). ``read``: more
    files the run reads, kept from being written (the CLI's config file); ``say`` gets each line
    a search prints before its summary (a trial's when it ends); ``check_loop``: sample one image
    first (a loop of your own, checked before any trial)."""
    from . import workers as W
    from .objective import trial_line
    from .optimizers import pruning_text, unpruned_rungs
    from .storage import check_storage_url, run_files
    from .study import baseline_trial, finished_trials, optimizer_of, queued_warm_starts, reduction_factor_of

    say = say or (lambda line: None)
    check_window_family(family, freeu_window, freeu_variant)  # before the model loads
    check_rho_range(rho_range)
    if study is not None:
        check_study_name(study)
    check_storage_url(storage)  # an in-memory storage: before the model loads
    own = isinstance(source, OwnModel)
    source = source if source is not None else ModelSource(task.get("model", Task.model))
    read = [*([] if own else source.inputs()), ("the prompt file", task.get("prompts")),
            *reference_inputs(task.get("reference", Task.reference)),
            ("the feature extractor weights", feature_weights), *read, *run_files(storage)]
    if out is not None:  # before any work: not the storage, nor anything the run reads
        check_output(out, read)
    if workers > 1:
        W.own_setup(workers)
    task = Task(**{**task, "rungs": default_rungs(task.get("n", Task.n)) if task.get("rungs") is None
                   else task["rungs"]})
    if task.reference == "bundled" and own:  # refused before your model is hooked: it has no record of its data
        check_bundled_reference(task.model, None)
    children = []
    if workers > 1 and not own:
        source = source.for_workers()  # the workers load the same kind (one registered here alone is refused)
        children = W.start(workers, W.load(task, source, dict(batch_size=batch_size, feature_weights=feature_weights,
                                                              device=device), threads))
    with W.stopped_with(children):  # failed or interrupted: the workers are stopped and waited for first
        evaluator = Evaluator(task, batch_size, source=source, feature_weights=feature_weights, device=device)
        evaluator.check_reference()  # before any trial: statistics and the extractor's weights are there and fit
        if check_loop:
            evaluator.images(evaluator.controller.identity(), seeds=[task.seed], progress=False)
        settings = dict(family=family, placement=placement, rho_range=tuple(rho_range), knots=knots,
                        freeu_window=freeu_window, freeu_variant=freeu_variant, study=study, heartbeat=heartbeat,
                        search_seed=search_seed, optimizer=optimizer, warm_start=warm_start)
        space, opened = prepare(evaluator, storage, **settings, parallel=workers > 1)
        name = opened.study_name
        if out is None and default_out:  # the default beside the study, checked as soon as its name is known
            out = Path("studies") / f"{name}.best.json"
            check_output(out, read)
        label, factor = objective_label(task.objective), reduction_factor_of(opened.user_attrs)
        say(f"study {name!r} in {shown_url(storage)}: {finished_trials(opened)} finished trials so far; "
            f"{task.sampler} NFE {task.nfe} ({task.sigma_grid} σ grid), N = {task.n} samples "
            f"(rungs {','.join(map(str, task.rungs))}), seeds {task.seed_label}, "
            f"objective {task.objective}, {task.precision}, optimizer {optimizer_of(opened.user_attrs)}, "
            f"{pruning_text(task.rungs, factor)}")
        if warm := queued_warm_starts(opened):
            say("warm start: after the baseline, the best of " + ", ".join(
                f"NFE {w['nfe']} ({label} {w['value']:.4g}, trial {w['trial']} of {w['study']})" for w in warm))
        if unchecked := unpruned_rungs(task.rungs, factor):
            say(f"note: successive halving checks a trial as its samples reach N = {task.rungs[0]} x {factor}^k, "
                f"so rung(s) {','.join(map(str, unchecked))} report FID but never prune")

        def report(study, trial) -> None:
            if line := trial_line(study, trial, task.objective):
                say(line)

        share = None
        if workers > 1:
            shares = W.split(max(0, trials - finished_trials(opened)), workers)
            say(f"{workers} workers: {', '.join(map(str, shares))} trials")
            # in place: ``stopped_with`` holds this list, and the workers left without trials are gone from it
            children[:] = W.assign(children, shares, W.job(storage, {**settings, "study": name}, trials, timeout))
            share = shares[0]
        run_search(evaluator, opened, space, trials, timeout, on_trial=report, artifacts=artifact_dir(storage),
                   share=share, progress=workers == 1 if progress is None else progress)
        failed = W.wait(children)
    if failed:
        raise StudyError(f"{failed} worker(s) failed; rerun the same command to finish the study")
    base = baseline_trial(opened)
    best = export_best(opened, storage)
    if out is not None:
        best.save(out)
    return Outcome(opened, space, task, best, base, Path(out) if out is not None else None)


def tune(model: torch.nn.Module, sample: SampleFn, *, name: str, reference: str, trials: int = 16,
         n: int = 1000, rungs: tuple[int, ...] | None = None, seed: int = 0, nfe: int = 1,
         features: str = DEFAULT_FEATURES, objective: str = "fid", family: str = "linear",
         placement: str = "input", rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3,
         freeu_window: bool = True, freeu_variant: str = "v1-stages",
         sigma_range: tuple[float, float] | None = None, timestep_to_sigma: Callable | None = None,
         storage: str = DEFAULT_STORAGE, study: str | None = None, optimizer: str | None = None, search_seed: int = 0,
         batch_size: int = 250, feature_weights: str | None = None, out: str | Path | None = None,
         progress: bool = True, warm_start: bool = True) -> RhoSchedule:
    """Run (or resume) the study for ``model`` (any module the adapters understand, or one holding
    it at .unet/.net/.model) sampled by your own ``sample(seeds) -> uint8 images [N, C, H, W]``
    (sample i from seeds[i], the same in every call): the same storage, rungs, pruning, first
    trials, dashboard artifacts and export as ``skiptune-search search`` (both are ``run``).
    ``name`` labels the model (study names, the schedule's tuned_for), ``nfe`` your sampler's
    model calls (a label); ``reference`` is an .npz of reference statistics or a folder of images
    ('bundled', Fashion-MNIST's statistics, is refused: nothing says your model was trained on
    Fashion-MNIST). Every argument is checked (``check_tune_arguments``, with the command line's
    bounds) before anything loads or is written: a wrong one is one InputError naming it.
    σ-dependent families need ``sigma_range`` (the σ your sampler visits) and, unless the model
    sits in an EDM-style Precond wrapper, ``timestep_to_sigma`` (per_noise, and the FreeU
    families with their σ window); ``freeu_window=False`` makes a FreeU family act at every σ (as
    ``search --no-window``), needing neither; ``freeu_variant`` the FreeU function searched (as
    ``search --freeu-variant``). A new study first tries (after the untuned model) the best of
    the same search's studies at other NFEs in ``storage``, unless ``warm_start`` is off.
    Returns the best schedule, also written to ``out``."""
    check_tune_arguments(locals())
    task = dict(model=name, sampler=CUSTOM, nfe=nfe, n=n, seed=seed, features=features, reference=reference,
                rungs=rungs, objective=objective)
    return run(task, OwnModel(model, sample, timestep_to_sigma, sigma_range), storage=storage, study=study,
               family=family, placement=placement, rho_range=rho_range, knots=knots, freeu_window=freeu_window,
               freeu_variant=freeu_variant, optimizer=optimizer, search_seed=search_seed, warm_start=warm_start,
               trials=trials, batch_size=batch_size, feature_weights=feature_weights, out=out, default_out=False,
               progress=progress, check_loop=True).best
