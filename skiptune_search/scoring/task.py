"""The task: what every trial of a study samples and how it is scored.

Two FIDs compare only when their tasks match (model, sampler, NFE, σ grid, samples, seeds,
features, reference, rungs, objective, prompts, guidance, image size, precision): a study stores
its task's ``scoring_key`` and refuses to resume under another one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..core.errors import InputError
from ..core.limits import GUIDANCE_RANGE, MAX_N, MAX_NFE, MAX_SEED, SIZE_RANGE, check_float, check_int
from ..bundled import DEFAULT_MODEL_NAME
from ..sampling import SAMPLER_NAMES, SIGMA_GRIDS, SIGMA_SAMPLERS, canonical_sampler
from ..sampling.samplers import check_sigma_grid, default_sigma_grid, steps_for_nfe
from . import DEFAULT_FEATURES, FEATURE_LAYERS, PRECISIONS
from .objectives import objective as objective_of

CUSTOM = "custom"  # the sampler of a model sampled by the caller's own loop (Python API)
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance of text models when none is given (diffusers' SD default)


@dataclass(frozen=True)
class Task:
    """What one trial generates and how it is scored: every trial of a study shares it."""

    model: str = DEFAULT_MODEL_NAME
    # a σ-space sampler, or a diffusers scheduler (short or class name) for a pipeline; None: the
    # model's own (``default_sampler``: a text-to-image pipeline's scheduler, else heun)
    sampler: str | None = "heun"
    nfe: int = 9
    n: int = 1000  # samples per trial
    seed: int = 0  # trial samples use seeds seed .. seed + n - 1
    features: str = DEFAULT_FEATURES
    reference: str = "bundled"  # 'bundled', an .npz (mu, sigma), 'fashion-mnist:test' or an image folder
    rungs: tuple[int, ...] = ()  # sample counts at which a trial reports FID; the last is n
    objective: str = "fid"  # scoring.objectives: 'fid' (at n), 'fid_inf' (extrapolated to N -> inf), 'kid'
    sigma_grid: str | None = None  # 'karras' or 'model'; None: the sampler's default (default_sigma_grid)
    prompts: str | None = None  # a text model's prompt file (one per line); seed s uses prompt s mod P
    guidance: float | None = None  # classifier-free guidance scale of a text model (1: none)
    height: int | None = None  # a text-to-image pipeline's image size (None: the pipeline's own)
    width: int | None = None
    precision: str = "fp32"  # a key of PRECISIONS

    def __post_init__(self) -> None:
        self._check_types()
        rungs = tuple(self.rungs) or (self.n,)
        if list(rungs) != sorted(set(rungs)) or rungs[0] < 2 or rungs[-1] != self.n:
            raise InputError(f"rungs {','.join(map(str, rungs))} must increase from at least 2 up to n = {self.n}",
                             option="rungs")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
                             option="precision")
        objective_of(self.objective).check_rungs(rungs)  # a registered objective (scoring.objectives), its rungs
        object.__setattr__(self, "rungs", rungs)
        if self.sampler == CUSTOM:  # the caller's loop: its NFE is a label, it has no σ grid of ours
            object.__setattr__(self, "sigma_grid", CUSTOM)
        else:
            sampler = canonical_sampler(self.sampler)
            if sampler is None:
                raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)} or a "
                                 f"diffusers scheduler class name (e.g. KDPM2AncestralDiscreteScheduler)",
                                 option="sampler")
            object.__setattr__(self, "sampler", sampler)
            if sampler in SIGMA_SAMPLERS:  # a scheduler's NFE is checked against the scheduler itself
                steps_for_nfe(self.sampler, self.nfe)
            grid = self.sigma_grid or default_sigma_grid(self.sampler)
            check_sigma_grid(self.sampler, grid)
            object.__setattr__(self, "sigma_grid", grid)
        if self.prompts is None and self.guidance is not None:
            raise InputError("guidance applies to text-to-image models: give a prompt file too", option="guidance")
        if self.prompts is not None:
            guidance = DEFAULT_GUIDANCE if self.guidance is None else float(self.guidance)
            if not guidance >= 1:  # diffusers pipelines guide only above 1, and treat anything below as 1
                raise InputError(f"guidance {self.guidance} must be at least 1 (1 is no guidance)", option="guidance")
            object.__setattr__(self, "guidance", guidance)
        for option in ("height", "width"):
            value = getattr(self, option)
            if value is not None and (self.prompts is None or isinstance(value, bool) or not isinstance(value, int)
                                      or value < 8):
                raise InputError(f"{option} {value}: an image size is a whole number of pixels (at least 8) of a "
                                 f"text-to-image pipeline, given with its prompt file", option=option)

    def _check_types(self) -> None:
        """Each field of its type and within the bounds the command line has (``core.limits``):
        one InputError naming the field, before anything loads."""
        for name in ("model", "reference"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{name} = {value!r} is not a name or path (a non-empty string)", option=name)
        if self.sampler is None:  # the model's own: a text-to-image pipeline's scheduler, else heun
            object.__setattr__(self, "sampler", default_sampler(self.model))
        for name in ("sampler", "features", "objective", "precision"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} = {getattr(self, name)!r} is not a name (a string)", option=name)
        if self.features not in FEATURE_LAYERS:
            raise InputError(f"unknown features {self.features!r}; choose one of {', '.join(FEATURE_LAYERS)}",
                             option="features")
        object.__setattr__(self, "nfe", check_int(self.nfe, "nfe", 1, MAX_NFE))
        object.__setattr__(self, "n", check_int(self.n, "n", 2, MAX_N))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0, MAX_SEED))
        if self.seed + self.n - 1 > MAX_SEED:
            raise InputError(f"seeds {self.seed}..{self.seed + self.n - 1} go past the last seed {MAX_SEED}; start "
                             f"from a lower seed", option="seed")
        if isinstance(self.rungs, (str, bytes)) or not isinstance(self.rungs, Iterable):
            raise InputError(f"rungs = {self.rungs!r} is not a sequence of sample counts, e.g. (250, 1000)",
                             option="rungs")
        object.__setattr__(self, "rungs", tuple(check_int(r, "rungs", 2, self.n) for r in self.rungs))
        if self.sigma_grid is not None and self.sigma_grid not in SIGMA_GRIDS + (CUSTOM,):
            raise InputError(f"unknown sigma_grid {self.sigma_grid!r}; choose one of {', '.join(SIGMA_GRIDS)}",
                             option="sigma_grid")
        if self.prompts is not None:
            if not isinstance(self.prompts, (str, os.PathLike)) or not os.fspath(self.prompts):
                raise InputError(f"prompts = {self.prompts!r} is not the path of a prompt file", option="prompts")
            object.__setattr__(self, "prompts", os.fspath(self.prompts))
        if self.guidance is not None:
            # at least 1 is checked with the prompts below
            object.__setattr__(self, "guidance", check_float(self.guidance, "guidance", high=GUIDANCE_RANGE[1]))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(getattr(self, name), name, *SIZE_RANGE))

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n))

    @property
    def seed_label(self) -> str:
        return f"{self.seed}-{self.seed + self.n - 1}"

    def scoring_key(self) -> dict:
        """The settings that must match for two FIDs to be comparable (with the prompts' digest,
        so an edited prompt file is another task)."""
        key = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.prompts is not None:
            from ..models.prompts import prompts_digest

            key["prompts_sha256"] = prompts_digest(self.prompts)
        return key


def default_rungs(n: int) -> tuple[int, ...]:
    """A search's rungs when none are given: (N/8, N), or just (N) when N/8 < 2. Successive halving
    checks a trial once, at N/8 (whatever the optimizer's share, ``search.optimizers``)."""
    return (n // 8, n) if n // 8 >= 2 else (n,)


def default_sampler(model: str) -> str:
    """The sampler of a model for which none is named: a text-to-image pipeline's own scheduler
    (the one its scheduler config names; it has no σ-space sampler), heun for the others."""
    from ..models.pipelines import is_pipeline_source, own_scheduler

    own = own_scheduler(model) if is_pipeline_source(model) else None
    return canonical_sampler(own) or "heun" if own else "heun"


def with_legacy_defaults(task_key: dict) -> dict:
    """A stored task key with the fields added since it was written, at the values it ran with."""
    defaults = {"sigma_grid": default_sigma_grid(task_key.get("sampler", "heun")), "prompts": None, "guidance": None,
                "precision": "fp32", "height": None, "width": None}
    return {**defaults, **task_key}


def resolve_device(device: str = "auto"):
    """'auto' is the first CUDA GPU when there is one (CUDA_VISIBLE_DEVICES applies), else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        # MPS and the rest: the σ and ρ arithmetic runs in float64, which MPS lacks
        raise InputError(f"{device}: not a device this tool runs on; use 'auto', 'cpu', 'cuda' or 'cuda:N'",
                         option="device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{device}: no CUDA GPU is visible to torch; use the CPU", option="device")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise InputError(f"{device}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0",
                         option="device")
    return torch.device(device)


def autocast_dtype(precision: str):
    """The torch dtype the model's forward is autocast to, or None for fp32."""
    import torch

    name = PRECISIONS[precision]
    return getattr(torch, name) if name else None
