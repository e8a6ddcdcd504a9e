"""A search from start to export, in one place for the CLI and for Python.

``prepare`` turns an evaluator (a task's model, ready to score) and the search settings into a
space and an opened study; ``tune`` is the whole search for a model and sampling loop of your own:

>>> from skiptune_search.search.tune import tune
>>> best = tune(unet, my_sample, name="my-unet", reference="ref.npz", trials=16)   # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

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
from ..scoring import DEFAULT_FEATURES
from ..scoring.evaluator import Evaluator, SampleFn, check_bundled_reference
from ..scoring.task import CUSTOM, Task
from . import DEFAULT_STORAGE, OPTIMIZERS
from .objective import run_search
from .space import Space, log_spaced_knots
from .storage import artifact_dir, make_storage
from .study import check_study_name, default_study_name, export_best, open_study


def prepare(evaluator: Evaluator, storage: str, *, family: str = "linear", placement: str = "input",
            rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3, freeu_window: bool = True,
            study: str | None = None, heartbeat: int | None = 60, search_seed: int = 0, optimizer: str = "tpe",
            parallel: bool = False, warm_start: bool = True,
            freeu_variant: str = "v1-stages") -> tuple[Space, optuna.Study]:
    """The search space (σ knots of per_noise, and FreeU's σ window, over the sampler's σ range) and
    the study (created, or resumed after its settings are checked; named after the task unless given;
    a new one warm-started from the same search's studies at other NFEs unless ``warm_start`` is off)."""
    ctl = evaluator.controller
    if placement != "search":
        ctl.check_placement(placement)  # before any trial: a placement the architecture cannot take
    elif ctl.placements == ("input",):
        raise ScheduleError(f"a searched placement picks among input, normalized and both, but {ctl.arch} has no "
                            f"normalization at the decoder input, so only input applies: use placement input",
                            option="placement")
    space = make_space(evaluator, family, placement, rho_range, knots, freeu_window, freeu_variant)
    name = check_study_name(study) if study else default_study_name(evaluator.task, space)
    opened = open_study(make_storage(storage, heartbeat), name, evaluator.task, space, evaluator.controller,
                        search_seed, optimizer, parallel, warm_start)
    return space, opened


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


def tune(model: torch.nn.Module, sample: SampleFn, *, name: str, reference: str, trials: int = 16,
         n: int = 1000, rungs: tuple[int, ...] | None = None, seed: int = 0, nfe: int = 1,
         features: str = DEFAULT_FEATURES, objective: str = "fid", family: str = "linear",
         placement: str = "input", rho_range: tuple[float, float] = (0.5, 1.5), knots: int = 3,
         freeu_window: bool = True, freeu_variant: str = "v1-stages",
         sigma_range: tuple[float, float] | None = None, timestep_to_sigma: Callable | None = None,
         storage: str = DEFAULT_STORAGE, study: str | None = None, optimizer: str = "tpe", search_seed: int = 0,
         batch_size: int = 250, feature_weights: str | None = None, out: str | Path | None = None,
         progress: bool = True, warm_start: bool = True) -> RhoSchedule:
    """Run (or resume) the study for ``model`` (any module the adapters understand, or one holding
    it at .unet/.net/.model) sampled by your own ``sample(seeds) -> uint8 images [N, C, H, W]``
    (sample i from seeds[i], the same in every call): the same storage, rungs, pruning, first
    trials, dashboard artifacts and export as ``skiptune-search search``. ``name`` labels the
    model (study names, the schedule's tuned_for), ``nfe`` your sampler's model calls (a label);
    ``reference`` is an .npz of reference statistics or a folder of images ('bundled', Fashion-MNIST's
    statistics, is refused: nothing says your model was trained on Fashion-MNIST). Every argument
    is checked (``check_tune_arguments``, with the command line's bounds) before anything loads or
    is written: a wrong one is one InputError naming it. σ-dependent families
    need ``sigma_range`` (the σ your sampler visits) and, unless the model sits in an EDM-style
    Precond wrapper, ``timestep_to_sigma`` (per_noise, and the FreeU families with their σ window);
    ``freeu_window=False`` makes a FreeU family act at every σ (as ``search --no-window``), needing
    neither; ``freeu_variant`` the FreeU function searched (as ``search --freeu-variant``). A new
    study first tries (after the untuned model) the best of the same search's studies at other NFEs
    in ``storage``, unless ``warm_start`` is off. Returns the best schedule, also written to ``out``."""
    check_tune_arguments(locals())
    check_window_family(family, freeu_window, freeu_variant)
    if out is not None:  # before any work: not the storage, the reference or the weights this run reads
        from ..scoring.metrics import DEFAULT_REFERENCE

        ref = DEFAULT_REFERENCE if reference == "bundled" else reference
        check_output(out, [("the reference", ref), ("the feature extractor weights", feature_weights)],
                     storage=storage)
    task = Task(model=name, sampler=CUSTOM, nfe=nfe, n=n, seed=seed, features=features, reference=reference,
                rungs=rungs if rungs is not None else ((n // 4, n) if n // 4 >= 2 else (n,)), objective=objective)
    if task.reference == "bundled":  # refused before your model is hooked: it has no record of its training data
        check_bundled_reference(name, None)
    evaluator = Evaluator(task, batch_size, feature_weights=feature_weights, model=model, sample=sample,
                          timestep_to_sigma=timestep_to_sigma, sigma_range=sigma_range)
    evaluator.check_reference()
    evaluator.images(evaluator.controller.identity(), seeds=[seed], progress=False)  # the loop's output, checked
    space, opened = prepare(evaluator, storage, family=family, placement=placement, rho_range=rho_range,
                            knots=knots, freeu_window=freeu_window, freeu_variant=freeu_variant,
                            study=study or (f"{check_study_name(name)}-{family}"
                                            f"{'' if freeu_variant == 'v1-stages' else '-' + freeu_variant}"
                                            f"{'' if freeu_window else '-allsteps'}-{placement}"),
                            search_seed=search_seed, optimizer=optimizer, warm_start=warm_start)
    run_search(evaluator, opened, space, trials, artifacts=artifact_dir(storage), progress=progress)
    best = export_best(opened, storage)
    if out is not None:
        best.save(out)
    return best
