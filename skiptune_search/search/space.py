"""Search spaces: how trial parameters become a schedule, and the trials every study starts with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from ..core.schedule import PLACEMENTS, RhoSchedule, SkipInfo, family_params

PAPER_RAMP = {"rho_inner": 0.8, "rho_outer": 1.0}  # the paper's shape: deep skips damped, outer kept


@dataclass(frozen=True)
class Space:
    """A family, a placement ('search' to let Optuna pick one), ρ bounds and σ knots; ``step``
    restricts each ρ to a grid (the benchmark's replays on the exhaustive grid)."""

    family: str = "linear"
    placement: str = "input"
    rho_range: tuple[float, float] = (0.5, 1.5)
    sigma_knots: tuple[float, ...] = ()  # per_noise only
    step: float | None = None

    def as_dict(self) -> dict:
        return {"family": self.family, "placement": self.placement, "rho_range": list(self.rho_range),
                "sigma_knots": list(self.sigma_knots), **({"step": self.step} if self.step else {})}

    def params(self, skips: list[SkipInfo]) -> list[str]:
        return family_params(self.family, skips, len(self.sigma_knots))

    def baseline(self, skips: list[SkipInfo]) -> dict:
        """Parameters of ρ = 1 everywhere."""
        params: dict = {name: 1.0 for name in self.params(skips)}
        if self.placement == "search":
            params["placement"] = "input"
        return params

    def first_trials(self, skips: list[SkipInfo], optimizer: str) -> list[tuple[str, dict]]:
        """What every study runs first, by the user attribute that marks it: the ρ = 1 baseline,
        then (linear family, inside the range, not on a grid search) the paper-style ramp."""
        firsts = [("baseline", self.baseline(skips))]
        lo, hi = self.rho_range

        def allowed(v: float) -> bool:  # inside the range, and on the grid when ρ moves in steps
            return lo <= v <= hi and (not self.step or abs((v - lo) / self.step - round((v - lo) / self.step)) < 1e-6)

        if self.family == "linear" and optimizer != "grid" and all(map(allowed, PAPER_RAMP.values())):
            firsts.append(("paper_ramp", dict(PAPER_RAMP, **({"placement": "input"}
                                                             if self.placement == "search" else {}))))
        return firsts

    def suggest(self, trial: optuna.Trial, skips: list[SkipInfo]) -> tuple[dict[str, float], str]:
        lo, hi = self.rho_range
        params = {name: trial.suggest_float(name, lo, hi, step=self.step) for name in self.params(skips)}
        placement = (trial.suggest_categorical("placement", list(PLACEMENTS))
                     if self.placement == "search" else self.placement)
        return params, placement

    def schedule(self, arch: str, skips: list[SkipInfo], params: dict, **meta) -> RhoSchedule:
        params = dict(params)
        placement = params.pop("placement", self.placement)
        return RhoSchedule.from_family(self.family, arch, skips, params, sigma_knots=self.sigma_knots,
                                       placement=placement, **meta)


def log_spaced_knots(sigma_min: float, sigma_max: float, k: int) -> tuple[float, ...]:
    """``k`` σ knots evenly spaced in log σ from σ_min to σ_max."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return tuple(math.exp(lo + (hi - lo) * i / (k - 1)) for i in range(k))


def grid_values(points: int, lo: float = 0.5, hi: float = 1.5) -> list[float]:
    """``points`` evenly spaced values from ``lo`` to ``hi``, rounded so that 0.6 is 0.6."""
    return [round(lo + (hi - lo) * i / (points - 1), 6) for i in range(points)]
