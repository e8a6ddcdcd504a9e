"""Which trials Optuna proposes (samplers) and which it stops early (the pruner)."""

from __future__ import annotations

import warnings
from typing import Sequence

import optuna

from ..core.errors import InputError
from ..core.schedule import PLACEMENTS, SkipInfo
from . import OPTIMIZERS
from .space import Space

REDUCTION_FACTOR = 3  # successive halving keeps the best third at each checked rung


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
            return optuna.samplers.CmaEsSampler(seed=seed)
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


def make_pruner(rungs: Sequence[int]) -> optuna.pruners.BasePruner:
    """Successive halving from the first rung when there are several rungs, else none."""
    if len(rungs) < 2:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0], reduction_factor=REDUCTION_FACTOR)


def unpruned_rungs(rungs: Sequence[int], reduction_factor: int = REDUCTION_FACTOR) -> list[int]:
    """Rungs before the last that successive halving never checks: it prunes only at N = the
    first rung × factor^k, so the others report FID (and feed FID∞) but cannot prune."""
    checked, r = set(), rungs[0]
    while r < rungs[-1]:
        checked.add(r)
        r *= reduction_factor
    return [r for r in rungs[:-1] if r not in checked]
