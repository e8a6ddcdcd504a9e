"""Search spaces: how trial parameters become a schedule, and the trials every study starts with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
import torch

from ..core import freeu
from ..core.errors import InputError, ScheduleError
from ..core.families import PAPER_RAMP, family, family_names  # noqa: F401 (PAPER_RAMP: read from here too)
from ..core.schedule import PLACEMENTS, RhoSchedule, SkipInfo


def first_marks() -> tuple[str, ...]:
    """The user attributes that mark the first trials: the untuned model's, FreeU's preset's (the
    one that carries a value: the preset's name), then each registered family's own (paper_ramp)."""
    own = [t.mark for name in family_names() for t in family(name).first_trials]
    return ("baseline", "freeu_preset", *dict.fromkeys(own))


def first_note(attrs: dict) -> str | None:
    """What a trial line says of a family's own first trial (its user attributes ``attrs``), or None."""
    return next((t.note for name in family_names() for t in family(name).first_trials if attrs.get(t.mark)), None)


def mark_attrs() -> tuple[str, ...]:
    """``first_marks`` and freeu_preset_note (why that preset): what a retried trial keeps."""
    return (*first_marks(), "freeu_preset_note")


FREEU_GRID_STEP = 0.1  # a grid search's FreeU factors: 0.1 apart, so 1 and every preset lie on it
# FreeU's σ window searched over the sampler's model calls: the first and the last call it acts on,
# counted from the first call (the highest σ); they stand for freeu.WINDOW_PARAMS when the calls are known
CALL_PARAMS = ("first_call", "last_call")


@dataclass(frozen=True)
class Space:
    """A family, a placement ('search' to let Optuna pick one), ρ bounds and σ knots; ``step``
    restricts each ρ to a grid (the benchmark's replays on the exhaustive grid). The FreeU
    families (``freeu``, ``linear_freeu``) search b1, b2 in ``freeu.B_RANGE``, s1, s2 in
    ``freeu.S_RANGE`` and the σ window; ``freeu_model`` is the model family FreeU's preset is picked for (``freeu.recognize``;
    None: no published preset); without ``freeu_window`` FreeU acts at every σ, as diffusers'
    ``enable_freeu`` does, and the window's ends are not searched; ``freeu_variant`` (a key of
    ``freeu.VARIANTS``) is the FreeU function searched: diffusers' (v1-stages), or the one a UI
    computes (v1-channels, v2-channels: docs/forge-a1111.md).

    The window is searched as the first and the last of the sampler's model calls it acts on,
    when ``call_sigmas`` (the distinct σ of those calls, highest first) are known: a window that
    holds no call would re-score the untuned model. Its σ bounds then lie halfway (in log σ)
    between the chosen calls and their neighbours. Without them (your own sampling loop) its ends
    are searched in log σ over ``sigma_range`` (the sampler's σ_min, σ_max)."""

    family: str = "linear"
    placement: str = "input"
    rho_range: tuple[float, float] = (0.5, 1.5)
    sigma_knots: tuple[float, ...] = ()  # per_noise only
    step: float | None = None
    sigma_range: tuple[float, ...] = ()  # FreeU families only
    freeu_model: str | None = None  # FreeU families only
    freeu_window: bool = True  # FreeU families: search the σ window (False: FreeU at every σ)
    call_sigmas: tuple[float, ...] = ()  # FreeU families: the σ of the sampler's model calls, highest first
    freeu_variant: str = "v1-stages"  # FreeU families: which FreeU function (freeu.VARIANTS)

    @property
    def with_freeu(self) -> bool:
        return family(self.family).freeu

    def as_dict(self) -> dict:
        freeu_keys = {"sigma_range": list(self.sigma_range), "freeu_model": self.freeu_model} if self.with_freeu else {}
        if self.with_freeu and not self.freeu_window:  # only then: the settings of earlier studies stay as they were
            freeu_keys["freeu_window"] = False
        if self.searches_calls:  # only then: a window searched in σ keeps the settings it had
            freeu_keys["call_sigmas"] = list(self.call_sigmas)
        if self.with_freeu and self.freeu_variant != "v1-stages":  # likewise
            freeu_keys["freeu_variant"] = self.freeu_variant
        return {"family": self.family, "placement": self.placement, "rho_range": list(self.rho_range),
                "sigma_knots": list(self.sigma_knots), **({"step": self.step} if self.step else {}), **freeu_keys}

    @property
    def searches_calls(self) -> bool:
        """Whether FreeU's window is searched over the sampler's model calls (else in σ, or not at all)."""
        return self.with_freeu and self.freeu_window and len(self.call_sigmas) >= 2

    def params(self, skips: list[SkipInfo]) -> list[str]:
        names = family(self.family).params(skips, len(self.sigma_knots))
        if not self.freeu_window:
            return [n for n in names if n not in freeu.WINDOW_PARAMS]
        if self.searches_calls:
            return [CALL_PARAMS[freeu.WINDOW_PARAMS.index(n)] if n in freeu.WINDOW_PARAMS else n for n in names]
        return names

    def ranges(self, skips: list[SkipInfo]) -> dict[str, tuple[float, float, bool]]:
        """(low, high, log scale) of each parameter."""
        def bounds(name: str) -> tuple[float, float, bool]:
            if name in freeu.RANGES:
                return (*freeu.RANGES[name], False)
            if name in freeu.WINDOW_PARAMS:
                return (*self.sigma_range, True)
            if name in CALL_PARAMS:
                return (0, len(self.call_sigmas) - 1, False)
            return (*self.rho_range, False)

        return {name: bounds(name) for name in self.params(skips)}

    def check(self, skips: list[SkipInfo]) -> None:
        """Fail, before a study is written, when the family cannot act on this skip layout."""
        if not self.with_freeu:
            return
        if self.freeu_window and (len(self.sigma_range) != 2 or not 0 < self.sigma_range[0] < self.sigma_range[1]):
            raise InputError(f"the {self.family} family needs the sampler's σ range (σ_min < σ_max), got "
                             f"{list(self.sigma_range)}", option="family")
        try:
            freeu.stages(skips)
        except ScheduleError as exc:
            raise ScheduleError(f"family {self.family}: {exc}", option="family") from None

    def baseline(self, skips: list[SkipInfo]) -> dict:
        """Parameters of the untuned model: ρ = 1 everywhere, FreeU's factors 1 at every σ."""
        params: dict = {name: 1.0 for name in self.params(skips)}
        if self.searches_calls:
            params.update(first_call=0, last_call=len(self.call_sigmas) - 1)
        elif self.with_freeu and self.freeu_window:
            params.update(zip(freeu.WINDOW_PARAMS, self.sigma_range))
        if self.placement == "search":
            params["placement"] = "input"
        return params

    def first_trials(self, skips: list[SkipInfo], optimizer: str) -> list[tuple[str, dict]]:
        """What every study runs first, by the user attribute that marks it: the untuned model;
        for the FreeU families FreeU's published preset for the model (``marks`` names it); then
        the family's own first trials (linear's paper-style ramp) where they lie inside the range,
        not on a grid search."""
        base = self.baseline(skips)
        firsts = [("baseline", base)]
        if self.with_freeu:
            preset = freeu.preset_for(self.freeu_model)[1]
            firsts.append(("freeu_preset", {**base, **{name: getattr(preset, name) for name in freeu.FACTORS}}))
        lo, hi = self.rho_range

        def allowed(v: float) -> bool:  # inside the range, and on the grid when ρ moves in steps
            return lo <= v <= hi and (not self.step or abs((v - lo) / self.step - round((v - lo) / self.step)) < 1e-6)

        if optimizer != "grid":
            firsts += [(t.mark, {**base, **t.params}) for t in family(self.family).first_trials
                       if all(map(allowed, t.params.values()))]
        return firsts

    def marks(self, attr: str) -> dict:
        """The user attributes of a first trial: ``{attr: True}``, or for FreeU's preset its name
        and why that one."""
        if attr != "freeu_preset":
            return {attr: True}
        name, _, why = freeu.preset_for(self.freeu_model)
        return {"freeu_preset": name, "freeu_preset_note": why}

    def grid(self, skips: list[SkipInfo], points: int) -> dict[str, list[float]]:
        """A grid search's values: ``points`` per ρ over its range; FreeU's factors 0.1 apart over
        theirs; the σ window fixed to the whole σ range (not searched on a grid)."""
        values = {}
        for name, (lo, hi, _) in self.ranges(skips).items():
            if name in (*freeu.WINDOW_PARAMS, *CALL_PARAMS):
                values[name] = [lo] if name in ("sigma_lo", "first_call") else [hi]
            elif name in freeu.RANGES:
                values[name] = grid_values(round((hi - lo) / FREEU_GRID_STEP) + 1, lo, hi)
            else:
                values[name] = grid_values(points, lo, hi)
        return values

    def suggest(self, trial: optuna.Trial, skips: list[SkipInfo]) -> tuple[dict[str, float], str]:
        params = {name: trial.suggest_int(name, lo, hi) if name in CALL_PARAMS else
                  trial.suggest_float(name, lo, hi, log=log, step=None if log or name in freeu.RANGES else self.step)
                  for name, (lo, hi, log) in self.ranges(skips).items()}
        placement = (trial.suggest_categorical("placement", list(PLACEMENTS))
                     if self.placement == "search" else self.placement)
        return params, placement

    def window(self, params: dict) -> tuple[float, float] | None:
        """FreeU's σ window of a trial's ``first_call`` and ``last_call`` (or, searched in σ, its
        ``sigma_lo`` and ``sigma_hi``; either in either order): None when it spans every call or the
        whole σ range (FreeU at every step, σ-independent); ends that meet are widened by the
        window's tolerance (a window at one σ)."""
        if self.searches_calls:
            return calls_window(self.call_sigmas, int(params["first_call"]), int(params["last_call"]))
        lo, hi = sorted((float(params["sigma_lo"]), float(params["sigma_hi"])))
        r = freeu.WINDOW_RTOL
        if lo <= self.sigma_range[0] * (1 + r) and hi >= self.sigma_range[1] * (1 - r):
            return None
        if hi <= lo * (1 + r):
            lo, hi = lo * (1 - r), hi * (1 + r)
        return lo, hi

    def carried(self, other: "Space", params: dict, skips: list[SkipInfo]) -> dict | None:
        """A trial's ``params`` from ``other`` (the space of the same family at another NFE) as
        parameters of this space: ρ and FreeU's factors as they are, FreeU's window moved to this
        sampler's calls (those inside it, or the one nearest its middle in log σ); None when they
        do not fit here (another parameter set, a value outside this space's ranges)."""
        new = {k: v for k, v in params.items() if k not in (*freeu.WINDOW_PARAMS, *CALL_PARAMS)}
        window = other.window(params) if other.with_freeu and other.freeu_window else None
        if self.searches_calls:
            new.update(zip(CALL_PARAMS, self.calls_in(window)))
        elif self.with_freeu and self.freeu_window:
            new.update(zip(freeu.WINDOW_PARAMS, window or self.sigma_range))
        ranges = self.ranges(skips)
        if set(new) - {"placement"} != set(ranges) or ("placement" in new) != (self.placement == "search"):
            return None
        if any(not lo <= new[k] <= hi for k, (lo, hi, _) in ranges.items()):
            return None
        return new

    def calls_in(self, window: tuple[float, float] | None) -> tuple[int, int]:
        """(first, last) of the model calls inside ``window`` (None: every call); for a window that
        holds none, the call nearest its middle in log σ."""
        last = len(self.call_sigmas) - 1
        if window is None:
            return 0, last
        inside = [i for i, s in enumerate(self.call_sigmas) if freeu.FreeU(window=window).active(torch.tensor(s))]
        if inside:
            return inside[0], inside[-1]
        middle = math.log(window[0] * window[1]) / 2
        nearest = min(range(last + 1), key=lambda i: abs(math.log(self.call_sigmas[i]) - middle))
        return nearest, nearest

    def schedule(self, arch: str, skips: list[SkipInfo], params: dict, **meta) -> RhoSchedule:
        params = dict(params)
        placement = params.pop("placement", self.placement)
        window = self.window(params) if self.with_freeu and self.freeu_window else None
        variant = {"freeu_variant": self.freeu_variant} if self.with_freeu else {}
        return RhoSchedule.from_family(self.family, arch, skips, params, sigma_knots=self.sigma_knots,
                                       sigma_window=window, placement=placement, **variant, **meta)


def calls_window(call_sigmas: tuple[float, ...], first: int, last: int) -> tuple[float, float] | None:
    """The σ window that holds the model calls ``first`` to ``last`` (indices into ``call_sigmas``,
    highest σ first, in either order) and no other: its ends halfway in log σ between a chosen call
    and the next one outside, or the outermost calls' own σ; None when it holds every call."""
    first, last = sorted((first, last))
    sig, k = call_sigmas, len(call_sigmas)
    if first == 0 and last == k - 1:
        return None
    hi = sig[0] if first == 0 else math.sqrt(sig[first - 1] * sig[first])
    lo = sig[-1] if last == k - 1 else math.sqrt(sig[last] * sig[last + 1])
    return lo, hi


def log_spaced_knots(sigma_min: float, sigma_max: float, k: int) -> tuple[float, ...]:
    """``k`` σ knots evenly spaced in log σ from σ_min to σ_max."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return tuple(math.exp(lo + (hi - lo) * i / (k - 1)) for i in range(k))


def grid_values(points: int, lo: float = 0.5, hi: float = 1.5) -> list[float]:
    """``points`` evenly spaced values from ``lo`` to ``hi``, rounded so that 0.6 is 0.6."""
    return [round(lo + (hi - lo) * i / (points - 1), 6) for i in range(points)]
