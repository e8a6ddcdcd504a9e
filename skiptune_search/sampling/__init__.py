"""Sampling: σ grids, samplers as small functions over a denoiser and a σ list, seeded noise.

``samplers`` holds the grids and samplers (k-diffusion's style), ``images`` the uint8
conversion and PNG grids. The names below are plain data, so the CLI lists its choices without
loading torch; ``samplers.SAMPLERS`` implements exactly these.
"""

# EDM-σ samplers on a σ grid, then diffusers' own schedulers (for DDPM-family diffusers models)
SAMPLER_NAMES = ("heun", "euler", "dpmpp_2m", "ddim", "dpmsolver", "unipc")
NATIVE_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
                     "unipc": "UniPCMultistepScheduler"}
SIGMA_GRIDS = ("karras", "model")
