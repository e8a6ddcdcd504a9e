"""ρ schedules: which coefficient multiplies each long skip, and the versioned JSON file.

A schedule is a table ρ[skip, knot] over the model's ordered skips (index 0 = outermost, the
first tensor the encoder saves; last = deepest) and optional noise-level knots σ_k. With no
knots ρ is constant in σ. Families (``linear``: the paper's ramp from ρ_inner at the deepest
skip to ρ_outer at the outermost) only decide how the table is filled: a reader needs nothing
but the table. A schedule may also hold FreeU's factors (``freeu.py``; families ``freeu``, ρ = 1,
and ``linear_freeu``, the linear ramp plus FreeU); such a file is format version 2, the others
stay version 1, and both load. The families themselves, and how to add one: ``families.py``.
Imports neither Optuna, torch-fidelity nor the CLI, and torch only to interpolate in σ, so the
CLI can list the families and placements without loading torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ScheduleError
from .families import family
from .families import family as _family  # for from_family, whose argument is named family
from .families import linear_rhos  # noqa: F401 (read from here too)
from .files import atomic_path, read_json
from .freeu import FACTORS as FREEU_FACTORS
from .freeu import WINDOW_PARAMS, FreeU, per_skip, stages
from .limits import GUIDANCE_RANGE, MAX_NFE, MAX_SEED, RHO_MAX, SIZE_RANGE
from .skips import SkipInfo, layout_fingerprint  # noqa: F401 (read from here too)

FORMAT = "skiptune-schedule/1"  # ρ only
FORMAT_FREEU = "skiptune-schedule/2"  # adds the "freeu" object
FORMATS = (FORMAT, FORMAT_FREEU)
RHO_LIMITS = (0.0, float(RHO_MAX))  # a ρ outside is almost surely a typo, not a schedule (core.limits)


@dataclass(frozen=True)
class BlockFactors:
    """What a schedule does to the input of the block that consumes one skip, at a noise level:
    where ``freeu`` holds, FreeU's ``b`` times the first half of the backbone channels and ``s``
    times the skip's lowest frequencies; then the skip times ``rho``. At one σ (a number) all are
    plain numbers, with b = s = 1 and ``freeu`` False outside FreeU's window. At per-sample σ (a
    tensor [B]), ``rho`` is a [B] float64 tensor where it depends on σ, and ``freeu`` a [B] bool
    tensor where FreeU has a window (b and s stay the stage's factors)."""

    rho: Any = 1.0
    b: float = 1.0
    s: float = 1.0
    freeu: Any = False

    @property
    def freeu_acts(self) -> bool:
        """Whether FreeU can change the block's input at this σ (for some sample)."""
        return (self.b, self.s) != (1.0, 1.0) and self.freeu is not False

    @property
    def changes_input(self) -> bool:
        """Whether the block's input can differ from the untuned model's at this σ."""
        rho_one = not hasattr(self.rho, "shape") and self.rho == 1.0
        return not rho_one or self.freeu_acts


PLACEMENTS = ("input", "normalized", "both")


def split_family(name: str) -> tuple[str | None, bool]:
    """(the ρ family or None for ρ = 1, whether FreeU's factors come with it): 'linear_freeu' ->
    ('linear', True), 'freeu' -> (None, True), 'per_layer' -> ('per_layer', False)."""
    f = family(name)
    return f.rho_family, f.freeu


def family_params(name: str, skips: Sequence[SkipInfo], n_knots: int = 3) -> list[str]:
    """The free parameters of a family on a skip layout (``families``: linear's ρ_inner,
    ρ_outer; per_level's ``rho_28px``...; per_layer's ``rho_0``...; per_noise's
    ``rho_inner_k0``...; FreeU's b1, b2, s1, s2, ``sigma_lo``, ``sigma_hi`` after its ρ family's)."""
    return family(name).params(skips, n_knots)


def family_table(name: str, skips: Sequence[SkipInfo], params: dict[str, float],
                 n_knots: int = 3) -> list[list[float]]:
    """The ρ table [skip][knot] of a family's parameters (all 1 for ``freeu``)."""
    f = family(name)
    missing = [n for n in f.params(skips, n_knots) if n not in params and n not in FREEU_FACTORS + WINDOW_PARAMS]
    if missing:
        raise ScheduleError(f"{f.rho_family} schedule needs parameters {', '.join(missing)}")
    return f.table(skips, {k: float(v) for k, v in params.items()}, n_knots)


@dataclass
class RhoSchedule:
    """A full ρ table for one skip layout, plus where it came from."""

    arch: str
    skips: list[SkipInfo]
    rho: list[list[float]]  # [skip][knot]; one column when sigma_knots is empty
    sigma_knots: list[float] = field(default_factory=list)
    family: str = "custom"
    params: dict[str, float] = field(default_factory=dict)
    placement: str = "input"
    tuned_for: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    freeu: FreeU | None = None  # FreeU's factors and σ window, on top of ρ

    def __post_init__(self) -> None:
        self.validate()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def constant(cls, arch: str, skips: Sequence[SkipInfo], rhos: Sequence[float], **meta) -> "RhoSchedule":
        """A σ-independent schedule with one ρ per skip."""
        return cls(arch=arch, skips=list(skips), rho=[[float(r)] for r in rhos], **meta)

    @classmethod
    def identity(cls, arch: str, skips: Sequence[SkipInfo]) -> "RhoSchedule":
        """ρ = 1 everywhere: the untuned model."""
        return cls.constant(arch, skips, [1.0] * len(skips), family="identity")

    @classmethod
    def linear(cls, arch: str, skips: Sequence[SkipInfo], rho_inner: float, rho_outer: float,
               **meta) -> "RhoSchedule":
        return cls.from_family("linear", arch, skips, {"rho_inner": rho_inner, "rho_outer": rho_outer}, **meta)

    @classmethod
    def from_family(cls, family: str, arch: str, skips: Sequence[SkipInfo], params: dict[str, float],
                    sigma_knots: Sequence[float] = (), sigma_window: tuple[float, float] | None = None,
                    freeu_variant: str = "v1-stages", **meta) -> "RhoSchedule":
        """A schedule of one family (``families``); one with ρ per σ (``per_noise``) takes its
        knots from ``sigma_knots``, the FreeU families their σ window from ``sigma_window`` (None:
        FreeU acts at every σ) and the function they compute from ``freeu_variant``
        (``freeu.VARIANTS``)."""
        f = _family(family)
        knots = [float(k) for k in sigma_knots] if f.per_sigma else []
        if f.per_sigma and not knots:
            raise ScheduleError(f"a {f.rho_family} schedule needs sigma_knots")
        table = family_table(family, skips, params, n_knots=len(knots) or 3)
        freeu = FreeU.from_params(params, window=sigma_window, variant=freeu_variant) if f.freeu else None
        return cls(arch=arch, skips=list(skips), rho=table, sigma_knots=knots, family=family,
                   params={k: float(v) for k, v in params.items()}, freeu=freeu, **meta)

    # --- evaluation --------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return layout_fingerprint(self.arch, self.skips)

    @property
    def is_constant(self) -> bool:
        """ρ is the same at every σ (FreeU's window aside: see ``depends_on_sigma``)."""
        return not self.sigma_knots

    @property
    def depends_on_sigma(self) -> bool:
        """Anything changes with σ: ρ between knots, or FreeU's factors through a window."""
        return not self.is_constant or (self.freeu is not None and self.freeu.window is not None)

    def rhos_at(self, sigma: float | None = None) -> list[float]:
        """ρ of every skip at noise level σ (interpolated in log σ, clamped outside the knots)."""
        if self.is_constant:
            return [row[0] for row in self.rho]
        if sigma is None:
            raise ScheduleError("this schedule depends on σ: pass the noise level")
        import torch

        from .interp import interp_log_sigma

        sigma = torch.tensor(float(sigma), dtype=torch.float64)
        return interp_log_sigma(*self._tables(torch.device("cpu")), sigma).tolist()

    def factors_at(self, sigma: "float | torch.Tensor | None" = None,
                   hidden: "Sequence[int | None] | None" = None) -> list[BlockFactors]:
        """What each skip's consuming block does at noise level σ (skip order: 0 = outermost): ρ
        and FreeU's factors, the one computation that ``apply()``, the ComfyUI node and the UI
        exports share. ``sigma``: a number; a tensor of one σ per sample (ρ is then interpolated
        on its device, in float64); None for a schedule that does not depend on σ. ``hidden``:
        each block's backbone channels, which FreeU keyed by channel count needs (``freeu.per_skip``)."""
        if sigma is None and self.depends_on_sigma:
            raise ScheduleError("this schedule depends on σ: pass the noise level")
        per_sample = sigma is not None and not isinstance(sigma, (int, float))
        if per_sample and not self.is_constant:
            from .interp import interp_log_sigma

            rhos = list(interp_log_sigma(*self._tables(sigma.device), sigma))
        else:
            rhos = self.rhos_at(None if self.is_constant else float(sigma))
        freeu_on = False
        if self.freeu is not None:
            freeu_on = True if self.freeu.window is None else self.freeu.active(sigma)
        out = []
        for rho, factors in zip(rhos, per_skip(self.freeu, self.skips, hidden)):
            if factors is None or freeu_on is False:
                out.append(BlockFactors(rho))
            else:
                out.append(BlockFactors(rho, *factors, freeu=freeu_on if per_sample else True))
        return out

    def _tables(self, device) -> tuple:
        """The log-σ knots and the ρ table [skip, knot] as float64 tensors on ``device``, made once
        per device (a σ-dependent schedule interpolates there with no copy per model call)."""
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            import torch

            cache[device] = (torch.tensor(self.sigma_knots, dtype=torch.float64, device=device).log(),
                             torch.tensor(self.rho, dtype=torch.float64, device=device))
        return cache[device]

    def enable_freeu_call(self) -> str | None:
        """diffusers' ``pipe.enable_freeu(s1=..., s2=..., b1=..., b2=...)`` with this schedule's
        FreeU factors, where diffusers does the same: a UNet2DConditionModel, no σ window (diffusers
        acts at every step) and no factor 0 (diffusers then switches FreeU off). ρ is not part of
        it. None otherwise."""
        return None if self.why_no_enable_freeu() else self.freeu.enable_freeu_call()

    def why_no_enable_freeu(self) -> str | None:
        """Why diffusers' ``enable_freeu`` cannot do this schedule's FreeU; None where it can."""
        f = self.freeu
        if f is None:
            return "no FreeU"
        if self.arch != "UNet2DConditionModel":
            return f"{self.arch} has no enable_freeu"
        if f.variant != "v1-stages":
            return f"it is FreeU {f.variant}; diffusers computes v1-stages"
        if f.window is not None:
            return "it has a σ window"
        if 0.0 in (f.b1, f.b2, f.s1, f.s2):
            return "a factor is 0, which diffusers reads as FreeU off"
        return None

    def is_identity(self) -> bool:
        return all(r == 1.0 for row in self.rho for r in row) and (self.freeu is None or self.freeu.is_identity())

    # --- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        columns = max(len(self.sigma_knots), 1)
        if len(self.rho) != len(self.skips):
            raise ScheduleError(f"rho has {len(self.rho)} rows but the layout has {len(self.skips)} skips")
        knots = self.sigma_knots
        if any(not (k > 0 and math.isfinite(k)) for k in knots) or any(a >= b for a, b in zip(knots, knots[1:])):
            raise ScheduleError("sigma_knots must be positive, finite and strictly increasing")
        if len(knots) == 1:
            raise ScheduleError("sigma_knots has one σ: a σ-dependent schedule needs at least 2 knots "
                                "(for ρ constant in σ, leave sigma_knots empty)")
        lo, hi = RHO_LIMITS
        for i, row in enumerate(self.rho):
            if len(row) != columns:
                raise ScheduleError(f"rho[{i}] has {len(row)} values, expected {columns} (one per σ knot)")
            for r in row:
                if not (isinstance(r, (int, float)) and math.isfinite(r) and lo < r <= hi):
                    raise ScheduleError(
                        f"rho[{i}] = {r!r} ({self.skips[i].name}) is outside ({lo}, {hi}]; "
                        f"use a finite ρ in that range"
                    )
        if self.placement not in PLACEMENTS:
            raise ScheduleError(f"placement {self.placement!r} is unknown; use one of {', '.join(PLACEMENTS)}")
        if self.freeu is not None:
            stages(self.skips)  # FreeU needs the two lowest-resolution decoder stages

    def check_layout(self, arch: str, skips: Sequence[SkipInfo]) -> None:
        """Fail with the first difference when this schedule was made for another layout."""
        if self.arch != arch:
            raise ScheduleError(f"schedule is for a {self.arch}, the model is a {arch}")
        if len(self.skips) != len(skips):
            raise ScheduleError(
                f"schedule has {len(self.skips)} skips, the model has {len(skips)}: "
                f"it was tuned for another architecture"
            )
        for i, (a, b) in enumerate(zip(self.skips, skips)):
            if (a.name, a.channels, a.resolution) != (b.name, b.channels, b.resolution):
                raise ScheduleError(
                    f"skip {i} differs: schedule has {a.name} ({a.channels} ch, {a.resolution}px), "
                    f"model has {b.name} ({b.channels} ch, {b.resolution}px)"
                )

    # --- JSON --------------------------------------------------------------------------
    def to_json(self) -> dict:
        """Format version 1 for a ρ schedule (as every earlier version wrote it), 2 with FreeU."""
        return {
            "format": FORMAT if self.freeu is None else FORMAT_FREEU,
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "skips": [s.as_dict() for s in self.skips],
            "sigma_knots": list(self.sigma_knots),
            "rho": self.rho,
            "placement": self.placement,
            "family": self.family,
            "params": self.params,
            "tuned_for": self.tuned_for,
            "metric": self.metric,
            "source": self.source,
            **({"freeu": self.freeu.as_json()} if self.freeu is not None else {}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "schedule") -> "RhoSchedule":
        _check_json(data, where)
        skips = [SkipInfo(s["name"], s.get("consumer", ""), s["channels"], s["resolution"])
                 for s in data["skips"]]
        try:
            schedule = cls(
                arch=data["arch"], skips=skips, rho=[list(map(float, r)) for r in data["rho"]],
                sigma_knots=[float(s) for s in data.get("sigma_knots", [])],
                family=data.get("family", "custom"), params=data.get("params", {}),
                placement=data.get("placement", "input"), tuned_for=data.get("tuned_for", {}),
                metric=data.get("metric", {}), source=data.get("source", {}),
                freeu=FreeU.from_json(data["freeu"]) if data.get("freeu") is not None else None,
            )
        except ScheduleError as exc:  # a value the schema cannot judge: say which file
            raise ScheduleError(f"{where}: {exc}", option=exc.option) from None
        if data["fingerprint"] != schedule.fingerprint:
            raise ScheduleError(f"{where}: fingerprint does not match its skip list (file edited by hand?)")
        return schedule

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temp file in the same folder, then a rename."""
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        return Path(path)


def load_schedule(source: "str | os.PathLike | RhoSchedule") -> RhoSchedule:
    """A schedule from a JSON file (validated) or an existing RhoSchedule."""
    if isinstance(source, RhoSchedule):
        return source
    path = Path(source)
    data = read_json(path, "schedule file", error=ScheduleError, option="schedule")
    return RhoSchedule.from_json(data, where=str(path)[:200])


# the bounds of a schedule's fields are the command line's own (core.limits: MAX_NFE, MAX_SEED, image
# sizes, guidance)
FREEU_VARIANT_KEYS = {"version": (1, 2), "keyed_by": ("stage", "channels")}  # optional, the default first
MAX_SKIPS = 4096  # the largest published UNets have a few dozen long skips
MAX_KNOTS = 1024
_REQUIRED = ("format", "arch", "fingerprint", "skips", "rho")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Fields:
    """Typed reads of one JSON object, each failure one ScheduleError naming the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, at: str, message: str) -> ScheduleError:
        return ScheduleError(f"{self.where}: {at} {message}; export the schedule again or correct that field",
                             option="schedule")

    def need(self, ok: bool, at: str, value: Any, expected: str) -> None:
        if not ok:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise self.fail(at, f"must be {expected}, not {shown}")

    def obj(self, value: Any, at: str) -> dict:
        self.need(isinstance(value, dict), at, value, "a JSON object")
        return value

    def array(self, value: Any, at: str, min_items: int = 0, max_items: int | None = None) -> list:
        self.need(isinstance(value, list), at, value, "a JSON array")
        if len(value) < min_items or (max_items is not None and len(value) > max_items):
            raise self.fail(at, f"holds {len(value)} items; it needs "
                                + (f"{min_items} to {max_items}" if max_items is not None else f"at least {min_items}"))
        return value

    def text(self, value: Any, at: str, optional: bool = False) -> None:
        self.need(isinstance(value, str) or (optional and value is None), at, value,
                  "a string" + (" or null" if optional else ""))

    def number(self, value: Any, at: str, lo: float | None = None, hi: float | None = None,
               optional: bool = False) -> None:
        if optional and value is None:
            return
        bounds = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else ""
        self.need(_is_number(value) and (lo is None or value >= lo) and (hi is None or value <= hi), at, value,
                  f"a finite number{bounds}" + (" or null" if optional else ""))

    def integer(self, value: Any, at: str, lo: int, hi: int, optional: bool = False) -> None:
        if optional and value is None:
            return
        self.need(_is_int(value) and lo <= value <= hi, at, value,
                  f"a whole number in [{lo}, {hi}]" + (" or null" if optional else ""))


def _check_json(data: Any, where: str) -> None:
    """A schedule file's fields, each of its type and within the command line's bounds, before
    anything reads them (formerly a JSON schema; written out so that reading a schedule needs no
    jsonschema: ComfyUI's node reads them with torch alone)."""
    f = _Fields(where)
    if not isinstance(data, dict):
        raise ScheduleError(f"{where}: holds no JSON object; export the schedule again", option="schedule")
    if data.get("format") not in FORMATS:
        raise ScheduleError(
            f"{where}: format {str(data.get('format'))[:60]!r} is not {FORMAT!r} or {FORMAT_FREEU!r}; "
            f"export it again with this version of skiptune-search", option="schedule"
        )
    if data["format"] == FORMAT and data.get("freeu") is not None:
        raise ScheduleError(f"{where}: FreeU factors need format {FORMAT_FREEU!r}, the file says {FORMAT!r}",
                            option="schedule")
    for key in _REQUIRED:
        if key not in data:
            raise ScheduleError(f"{where}: {key!r} is a required property; export the schedule again",
                                option="schedule")
    for key in ("arch", "fingerprint"):
        f.text(data[key], key)
    for key in ("placement", "family"):
        if key in data:
            f.text(data[key], key)
    for i, skip in enumerate(f.array(data["skips"], "skips", 1, MAX_SKIPS)):
        f.obj(skip, f"skips[{i}]")
        for key in ("name", "channels", "resolution"):
            if key not in skip:
                raise f.fail(f"skips[{i}]", f"lacks {key!r}")
        f.text(skip["name"], f"skips[{i}].name")
        if "consumer" in skip:
            f.text(skip["consumer"], f"skips[{i}].consumer")
        for key in ("channels", "resolution"):
            f.integer(skip[key], f"skips[{i}].{key}", 1, 1 << 20)
    for i, knot in enumerate(f.array(data.get("sigma_knots", []), "sigma_knots", 0, MAX_KNOTS)):
        f.number(knot, f"sigma_knots[{i}]")
    for i, row in enumerate(f.array(data["rho"], "rho", 0, MAX_SKIPS)):
        for j, r in enumerate(f.array(row, f"rho[{i}]", 1, MAX_KNOTS)):
            f.number(r, f"rho[{i}][{j}]")
    for k, v in f.obj(data.get("params", {}), "params").items():
        f.number(v, f"params.{k}")
    tuned = f.obj(data.get("tuned_for", {}), "tuned_for")
    for key in ("model", "sampler", "precision"):
        if key in tuned:
            f.text(tuned[key], f"tuned_for.{key}")
    for key in ("sigma_grid", "prompts"):
        if key in tuned:
            f.text(tuned[key], f"tuned_for.{key}", optional=True)
    if "nfe" in tuned:
        f.integer(tuned["nfe"], "tuned_for.nfe", 1, MAX_NFE)
    if "guidance" in tuned:
        f.number(tuned["guidance"], "tuned_for.guidance", *GUIDANCE_RANGE, optional=True)
    for key in ("height", "width"):
        if key in tuned:
            f.integer(tuned[key], f"tuned_for.{key}", *SIZE_RANGE, optional=True)
    metric = f.obj(data.get("metric", {}), "metric")
    for key in ("name", "features"):
        if key in metric:
            f.text(metric[key], f"metric.{key}")
    for key in ("value", "baseline"):
        if key in metric:
            f.number(metric[key], f"metric.{key}", optional=True)
    if "n" in metric:
        f.integer(metric["n"], "metric.n", 2, MAX_SEED)
    # chosen by eye (a preferential study): the number of choices (sets judged) behind it, no value
    if metric.get("name") == "eye" and "comparisons" not in metric:
        raise f.fail("metric", "is 'eye' (chosen by eye) but has no comparisons (the number of choices behind it)")
    if "comparisons" in metric:
        f.integer(metric["comparisons"], "metric.comparisons", 1, MAX_SEED)
    if "seeds" in metric:
        seeds = metric["seeds"]
        parts = seeds.split("-") if isinstance(seeds, str) else []
        ok = len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts) and int(parts[0]) <= int(parts[1]) <= MAX_SEED
        f.need(ok, "metric.seeds", seeds, "'FIRST-LAST', two seeds with FIRST <= LAST, e.g. '0-999'")
    source = f.obj(data.get("source", {}), "source")
    for key in ("study", "storage"):
        if key in source:
            f.text(source[key], f"source.{key}")
    if "trial" in source:
        f.integer(source["trial"], "source.trial", 0, MAX_SEED)
    if data.get("freeu") is not None:
        freeu = f.obj(data["freeu"], "freeu")
        for key in (*FREEU_FACTORS, "sigma_window"):
            if key not in freeu:
                raise ScheduleError(f"{where}: freeu: {key!r} is a required property; export the schedule again",
                                    option="schedule")
        extra = sorted(set(freeu) - {*FREEU_FACTORS, "sigma_window", *FREEU_VARIANT_KEYS})
        if extra:
            raise f.fail("freeu", f"has unknown key(s) {', '.join(map(repr, extra))}; it holds "
                                  f"{', '.join(FREEU_FACTORS)}, sigma_window and (optional) "
                                  f"{', '.join(FREEU_VARIANT_KEYS)} only")
        for key in FREEU_FACTORS:
            f.number(freeu[key], f"freeu.{key}")
        for key, allowed in FREEU_VARIANT_KEYS.items():
            f.need(freeu.get(key, allowed[0]) in allowed and not isinstance(freeu.get(key), bool), f"freeu.{key}",
                   freeu.get(key), f"one of {', '.join(map(repr, allowed))}")
        if freeu["sigma_window"] is not None:
            for i, v in enumerate(f.array(freeu["sigma_window"], "freeu.sigma_window", 2, 2)):
                f.number(v, f"freeu.sigma_window[{i}]")
