"""Sampling: σ grids, samplers as small functions over a denoiser and a σ list, seeded noise.

``samplers`` holds the grids and samplers (k-diffusion's style), ``images`` the uint8
conversion and PNG grids. The names below are plain data, so the CLI lists its choices without
loading torch; ``samplers.SAMPLERS`` implements exactly the σ-space ones. A diffusers pipeline is
sampled by its own ``__call__`` with one of diffusers' schedulers (``models.pipelines``).
"""

import re

# EDM-σ samplers on a σ grid, over a denoiser D(x, σ)
SIGMA_SAMPLERS = ("heun", "euler", "dpmpp_2m")
# diffusers' schedulers by short name: a pipeline's own __call__ steps with one of them (any other
# diffusers scheduler class the pipeline's scheduler config fits is taken by its class name)
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver_singlestep": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler",
    "euler_discrete": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun_discrete": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler", "kdpm2_ancestral": "KDPM2AncestralDiscreteScheduler",
}
SAMPLER_NAMES = SIGMA_SAMPLERS + tuple(SCHEDULERS)
SIGMA_GRIDS = ("karras", "model")


def canonical_sampler(name: str) -> str | None:
    """``name`` as a task stores it: a sampler's short name (a scheduler class given by its class
    name becomes its short name, where it has one), any other diffusers-style scheduler class name
    as given, or None when ``name`` is neither."""
    if name in SAMPLER_NAMES:
        return name
    short = next((k for k, v in SCHEDULERS.items() if v == name), None)
    if short is not None:
        return short
    return name if isinstance(name, str) and re.fullmatch(r"[A-Z][A-Za-z0-9]*Scheduler", name) else None


def scheduler_class(sampler: str) -> str:
    """The diffusers class name of a scheduler sampler (its short name or its class name)."""
    return SCHEDULERS.get(sampler, sampler)
