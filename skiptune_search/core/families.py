"""Families: how a search's parameters fill a schedule's ρ table (and FreeU's factors).

A family is one small ``Family`` object, registered by name with ``register_family``; everything
that needs to know about a family asks the registry (``family``): the schedule (``from_family``),
the search space (its parameters, σ knots, first trials), the command line (``--family``'s
choices and help). A reader of a schedule file needs none of it: the file holds the table.

The FreeU families are composed: ``with_freeu(rho)`` adds FreeU's factors b1, b2, s1, s2 and its
σ window's ends to a ρ family (``linear_freeu``), or to ρ = 1 (``freeu``). How to add one:
docs/extending.md. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ScheduleError
from .freeu import B_RANGE, FACTORS, S_RANGE, WINDOW_PARAMS
from .skips import SkipInfo

Params = Callable[[Sequence[SkipInfo], int], "list[str]"]  # (skips, σ knots) -> parameter names
Table = Callable[[Sequence[SkipInfo], "dict[str, float]", int], "list[list[float]]"]  # -> ρ[skip][knot]

PAPER_RAMP = {"rho_inner": 0.8, "rho_outer": 1.0}  # the paper's shape: deep skips damped, outer kept


@dataclass(frozen=True)
class FirstTrial:
    """A trial every study of a family runs first (after the untuned model and, for FreeU, its
    preset): its parameters, the user attribute that marks it, and what the trial's line says."""

    mark: str  # e.g. 'paper_ramp'
    params: dict
    note: str  # e.g. 'paper-style ramp'


@dataclass(frozen=True)
class Family:
    """One way to fill the ρ table [skip][knot] from a few parameters.

    ``params(skips, n_knots)``: the parameter names on a skip layout (each searched over the ρ
    range); ``table(skips, params, n_knots)``: the ρ table, one column per σ knot when
    ``per_sigma`` (the schedule then needs σ knots, which a search log-spaces over the sampler's
    σ range), else one. ``freeu``: FreeU's factors and σ window come with it (``rho``: the ρ
    family it is composed with, None for ρ = 1). ``help``: its line in ``--family``'s help."""

    name: str
    help: str
    params: Params
    table: Table
    per_sigma: bool = False
    freeu: bool = False
    rho: str | None = None
    first_trials: tuple[FirstTrial, ...] = ()

    @property
    def rho_family(self) -> str | None:
        """The ρ family (itself unless composed with FreeU; None for ρ = 1)."""
        return self.rho if self.freeu else self.name


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Make ``family`` known by its name to schedules, searches and the command line (which lists
    the families registered when it is imported)."""
    if not replace and family.name in _FAMILIES:
        raise ScheduleError(f"a family named {family.name!r} is already registered; pick another name")
    _FAMILIES[family.name] = family
    return family


def family_names(rho_only: bool = False) -> tuple[str, ...]:
    """The registered families' names, in registration order (``rho_only``: without FreeU)."""
    return tuple(name for name, f in _FAMILIES.items() if not (rho_only and f.freeu))


def family(name: str) -> Family:
    """The registered family ``name``."""
    if name not in _FAMILIES:
        raise ScheduleError(f"unknown family {name!r}; choose one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def families_help() -> str:
    """``--family``'s help, one clause per family."""
    return "ρ parameterization: " + ", ".join(f"{f.name} ({f.help})" for f in _FAMILIES.values()) + "."


def with_freeu(rho: Family | None, name: str, help: str) -> Family:
    """``rho``'s parameters (none for ρ = 1) plus FreeU's factors and σ window's ends."""
    def params(skips: Sequence[SkipInfo], n_knots: int) -> list[str]:
        return [*(rho.params(skips, n_knots) if rho else []), *FACTORS, *WINDOW_PARAMS]

    def table(skips: Sequence[SkipInfo], p: dict[str, float], n_knots: int) -> list[list[float]]:
        return rho.table(skips, p, n_knots) if rho else [[1.0] for _ in skips]

    return Family(name, help, params, table, per_sigma=bool(rho and rho.per_sigma), freeu=True,
                  rho=rho.name if rho else None, first_trials=rho.first_trials if rho else ())


# --- the built-in families ----------------------------------------------------------------------
def linear_rhos(n_skips: int, rho_inner: float, rho_outer: float) -> list[float]:
    """The paper's ramp: ρ_outer at skip 0 (outermost), ρ_inner at the deepest, linear between."""
    if n_skips == 1:
        return [float(rho_inner)]
    return [rho_outer + (rho_inner - rho_outer) * i / (n_skips - 1) for i in range(n_skips)]


def _levels(skips: Sequence[SkipInfo]) -> list[str]:
    return [f"rho_{r}px" for r in sorted({s.resolution for s in skips}, reverse=True)]


def _knot_params(skips: Sequence[SkipInfo], n_knots: int) -> list[str]:
    if n_knots < 2:
        raise ScheduleError("per_noise needs at least 2 σ knots")
    return [f"{end}_k{k}" for k in range(n_knots) for end in ("rho_inner", "rho_outer")]


def _knot_table(skips: Sequence[SkipInfo], p: dict[str, float], n_knots: int) -> list[list[float]]:
    columns = [linear_rhos(len(skips), p[f"rho_inner_k{k}"], p[f"rho_outer_k{k}"]) for k in range(n_knots)]
    return [list(row) for row in zip(*columns)]


LINEAR = register_family(Family(
    "linear", "ρ_inner at the deepest skip to ρ_outer at the outermost",
    lambda skips, k: ["rho_inner", "rho_outer"],
    lambda skips, p, k: [[r] for r in linear_rhos(len(skips), p["rho_inner"], p["rho_outer"])],
    first_trials=(FirstTrial("paper_ramp", PAPER_RAMP, "paper-style ramp"),)))
register_family(Family("per_level", "one ρ per resolution", lambda skips, k: _levels(skips),
                       lambda skips, p, k: [[p[f"rho_{s.resolution}px"]] for s in skips]))
register_family(Family("per_layer", "one per skip", lambda skips, k: [f"rho_{i}" for i in range(len(skips))],
                       lambda skips, p, k: [[p[f"rho_{i}"]] for i in range(len(skips))]))
register_family(Family("per_noise", "a linear pair at each of --knots σ knots, interpolated in log σ",
                       _knot_params, _knot_table, per_sigma=True))
register_family(with_freeu(
    None, "freeu",
    f"FreeU on the two lowest-resolution decoder stages: backbone factors b1, b2 in [{B_RANGE[0]:g}, "
    f"{B_RANGE[1]:g}], skip low-frequency factors s1, s2 in [{S_RANGE[0]:g}, {S_RANGE[1]:g}], acting while σ is "
    "inside a window searched in log σ over the sampler's σ range; ρ = 1; its first trials are the untuned model, "
    "then FreeU's published preset for the model: SD1.x, SD2.x, SDXL recognized from the UNet's config, else "
    "SD1.5's values"))
register_family(with_freeu(LINEAR, "linear_freeu", "linear ρ plus freeu"))
