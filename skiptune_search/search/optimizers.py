"""Which trials Optuna proposes (samplers) and which it stops early (the pruner)."""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Sequence

import optuna

from ..core.errors import InputError, StudyError
from ..core.schedule import PLACEMENTS, SkipInfo
from . import OPTIMIZERS
from .space import Space

# successive halving keeps the best 1/factor at each checked rung: with the default rungs (N/8, N),
# a trial goes on to N only if it is among the best 1/factor of those scored at N/8. The factor is
# the optimizer's (BENCHMARKS.md table 4, real searches per family at NFE 5): TPE keeping an eighth
# missed its target at 4 of 9 search seeds (linear, per_level, FreeU at every σ), keeping a third
# at none, in as many trials as without pruning; CMA-ES, counting a pruned trial toward its
# generation, keeps an eighth: it lost no seed to it and saved 68% on linear. GP does not prune
# (``NO_PRUNING``): Optuna's GPSampler models completed trials only, so with pruning it proposed at
# random and reached those targets at every seed on no method, without at every seed on five of the
# seven (linear, per_level, per_layer, per_noise, FreeU at every σ; windowed freeu and linear_freeu at
# 1 and 2 of 3, the most of any optimizer with its own pruning). Random keeps a third as TPE.
NO_PRUNING = 0  # a factor that prunes nothing: the rungs report FID only
REDUCTION_FACTORS = {"cmaes": 8, "gp": NO_PRUNING}
REDUCTION_FACTOR = 3  # every other optimizer's
LEGACY_OPTIMIZER = "tpe"  # every search's default before a study recorded its optimizer
LEGACY_REDUCTION_FACTOR = 3  # the factor before issue 27: of studies and results that do not record one
_SHARE = {2: "half", 3: "third", 4: "quarter", 8: "eighth"}


def make_sampler(optimizer: str, space: Space, skips: list[SkipInfo], seed: int,
                 grid_points: int = 11) -> optuna.samplers.BaseSampler:
    """The Optuna sampler that proposes trials; 'grid' spans each ρ with ``grid_points`` values
    (``Space.grid``)."""
    with warnings.catch_warnings():  # multivariate TPE and GP are 'experimental' in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if optimizer == "tpe":
            # constant liar: parallel workers do not all propose next to the same running trial
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True)
        if optimizer == "cmaes":
            # CMA-ES starts at the centre of the box (ρ = 1 for the default [0.5, 1.5]); Optuna deprecated x0
            return CmaEs(seed=seed)
        if optimizer == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if optimizer == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if optimizer == "grid":
            grid: dict[str, list] = space.grid(skips, grid_points)
            if space.placement == "search":
                grid["placement"] = list(PLACEMENTS)
            return optuna.samplers.GridSampler(grid, seed=seed)
    raise InputError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}", option="optimizer")


class _CmaState(pickle.Unpickler):
    """Builds only what Optuna's CMA-ES state holds (the cmaes optimizer and numpy arrays): a
    storage is a file, and nothing runs code from a file the user did not trust."""

    # numpy 2 (numpy._core) and 1 (numpy.core); _frombuffer: arrays at pickle protocol 5 (Python 3.14's default)
    ALLOWED = {("cmaes._cma", "CMA"), ("numpy", "dtype"), ("numpy", "ndarray"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise StudyError(f"a trial of this study holds a CMA-ES state that would build {module}.{name}, which "
                             f"no CMA-ES state does: the storage was written by something else, and it is not "
                             f"loaded; search with another optimizer or in a new study", option="optimizer")
        return super().find_class(module, name)


class CmaEs(optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES, its state (which Optuna pickles into the trials' system attributes) read
    back by ``_CmaState``, never by plain pickle. Plain CMA-ES only: the separable, with-margin and
    warm-started variants keep states of other classes.

    A pruned trial counts toward its generation at the FID of its last rung (Optuna's
    ``consider_pruned_trials``, which its docs advise beside successive halving): without it, a
    generation waits for ``popsize`` completed trials, and with the default pruning, which completes
    about one trial in eight, CMA-ES stayed at its first generation through a 30-trial search
    (BENCHMARKS.md table 4)."""

    def __init__(self, seed: int | None = None, popsize: int | None = None) -> None:
        with warnings.catch_warnings():  # 'experimental' in Optuna's words since 2.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(seed=seed, popsize=popsize, consider_pruned_trials=True)

    def _restore_optimizer(self, completed_trials):
        prefix = self._attr_key_optimizer
        for trial in reversed(completed_trials):
            attrs = {key: value for key, value in trial.system_attrs.items() if key.startswith(prefix)}
            if attrs:
                return _CmaState(io.BytesIO(bytes.fromhex(self._concat_optimizer_attrs(attrs)))).load()
        return None


def default_reduction_factor(optimizer: str) -> int:
    """The successive halving factor of a new study searched with ``optimizer`` (``REDUCTION_FACTORS``)."""
    return REDUCTION_FACTORS.get(optimizer, REDUCTION_FACTOR)


def make_pruner(rungs: Sequence[int], reduction_factor: int,
                min_resource: int | None = None) -> optuna.pruners.BasePruner:
    """Successive halving from the first rung (or from ``min_resource``, where the first check
    falls) when there are several rungs and a factor, else none."""
    if len(rungs) < 2 or reduction_factor == NO_PRUNING:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource or rungs[0],
                                                  reduction_factor=reduction_factor)


def wilcoxon_pruner() -> optuna.pruners.BasePruner:
    """Optuna's WilcoxonPruner at its defaults (p < 0.1): BENCHMARKS.md table 4 searches with it over
    blocks of samples, each rung reporting its block's own FID (``bench.cost.CachedScorer``)."""
    with warnings.catch_warnings():  # 'experimental' in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner()


def checked_rungs(rungs: Sequence[int], reduction_factor: int,
                  min_resource: int | None = None) -> list[int]:
    """The rungs before the last at which successive halving checks a trial: it checks the k-th
    time at the first rung of at least min_resource × factor^k samples (min_resource: the first rung)."""
    if reduction_factor == NO_PRUNING:
        return []
    checked, level, first = [], 0, min_resource or rungs[0]
    for r in rungs[:-1]:
        if r >= first * reduction_factor ** level:
            checked.append(r)
        while r >= first * reduction_factor ** level:
            level += 1
    return checked


def unpruned_rungs(rungs: Sequence[int], reduction_factor: int) -> list[int]:
    """Rungs before the last that successive halving never checks (``checked_rungs``): they report
    FID (and feed FID∞) but cannot prune (none without pruning, where no rung does)."""
    if reduction_factor == NO_PRUNING:
        return []
    checked = checked_rungs(rungs, reduction_factor)
    return [r for r in rungs[:-1] if r not in checked]


def pruning_text(rungs: Sequence[int], reduction_factor: int,
                 min_resource: int | None = None) -> str:
    """'successive halving keeping the best eighth at 125', as the docs and tables say it."""
    checked = checked_rungs(rungs, reduction_factor, min_resource)
    if not checked:
        return "no pruning"
    share = _SHARE.get(reduction_factor, f"1/{reduction_factor}")
    return f"successive halving keeping the best {share} at {' and '.join(map(str, checked))}"
