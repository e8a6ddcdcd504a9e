"""Objectives: the number a study minimizes, from a trial's rungs.

An objective is one small ``Objective`` object, registered by name with ``register_objective``;
the task checks its name and rungs, the evaluator computes its metric at each rung (``measure``,
for a metric of its own), the trial objective reports its rung values to the pruner and returns
its final value, and the command line lists it and names its values by its ``label`` ("FID",
"FID∞", "KID"). How to add one: docs/extending.md. Imports no torch (the CLI lists the
objectives without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..core.errors import InputError

if TYPE_CHECKING:
    from .evaluator import Rung


@dataclass(frozen=True)
class Objective:
    """``rung(r)``: the value a trial reports at rung ``r`` (what successive halving compares),
    named ``rung_label``; ``final(rungs)``: the study's value of a trial from all its rungs (the
    last one holds every sample), named ``label``; ``min_rungs``: the rungs it needs;
    ``needs_reference_features``: it needs the reference's feature vectors, not only mu and
    sigma; ``measure(features, reference)``: a metric of its own, which the evaluator computes at
    each rung into ``Rung.values[name]`` (None for FID and KID, which every rung holds);
    ``per_rung``: its value is a metric of the samples so far, so each rung has one (benchmark
    table 3 ranks it at each rung as ``NAME@N``), not one over all rungs (FID∞)."""

    name: str
    label: str
    help: str
    rung: Callable[["Rung"], float]
    final: Callable[[Sequence["Rung"]], float]
    rung_label: str | None = None  # None: the label
    min_rungs: int = 1
    needs_reference_features: bool = False
    measure: Callable[[Any, Any], float] | None = None
    per_rung: bool = True

    @property
    def rung_name(self) -> str:
        return self.rung_label or self.label

    def check_rungs(self, rungs: Sequence[int]) -> None:
        if len(rungs) < self.min_rungs:
            raise InputError(f"objective {self.name} needs at least {_COUNTS.get(self.min_rungs, self.min_rungs)} "
                             f"rungs (e.g. 250,1000)", option="rungs")


_COUNTS = {2: "two", 3: "three"}
_OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective, replace: bool = False) -> Objective:
    """Make ``objective`` known by its name to tasks, searches and the command line (which lists
    the objectives registered when it is imported)."""
    if not replace and objective.name in _OBJECTIVES:
        raise InputError(f"an objective named {objective.name!r} is already registered; pick another name",
                         option="objective")
    _OBJECTIVES[objective.name] = objective
    return objective


def objective_names() -> tuple[str, ...]:
    return tuple(_OBJECTIVES)


def objective(name: str) -> Objective:
    """The registered objective ``name``."""
    if name not in _OBJECTIVES:
        raise InputError(f"unknown objective {name!r}; choose one of {', '.join(_OBJECTIVES)}", option="objective")
    return _OBJECTIVES[name]


def objective_label(name: str) -> str:
    """How values of the objective ``name`` are named ("FID", "FID∞", "KID"); an objective not
    registered here (a study made elsewhere) by its own name."""
    return _OBJECTIVES[name].label if name in _OBJECTIVES else name


def proxy_names(rungs: Sequence[int]) -> list[str]:
    """The proxies benchmark table 3 ranks: each objective at each rung (``fid@250``...), or over
    all of them (``fid_inf``) where there are enough."""
    return [name for o in _OBJECTIVES.values()
            for name in ([f"{o.name}@{r}" for r in rungs] if o.per_rung else [o.name] * (len(rungs) >= o.min_rungs))]


def objectives_help() -> str:
    """``--objective``'s help, one clause per objective."""
    return "What the study minimizes: " + ", ".join(f"{o.name} ({o.help})" for o in _OBJECTIVES.values()) + "."


def _fid_inf(rungs: Sequence["Rung"]) -> float:
    from .metrics import fid_inf

    return fid_inf([r.n for r in rungs], [r.fid for r in rungs])


register_objective(Objective("fid", "FID", "FID at N", lambda r: r.fid, lambda rungs: rungs[-1].fid))
register_objective(Objective(
    "fid_inf", "FID∞", "FID extrapolated to N -> inf over the rungs: removes most of FID's small-N bias",
    lambda r: r.fid, _fid_inf, rung_label="FID", min_rungs=2, per_rung=False))
register_objective(Objective("kid", "KID", "unbiased; needs reference features", lambda r: r.kid,
                             lambda rungs: rungs[-1].kid, needs_reference_features=True))
