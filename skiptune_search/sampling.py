"""σ grids, samplers and seeded initial noise, in the style of k-diffusion.

Each sampler is a small function over a denoiser D(x, σ) and a list of σ ending in 0; the
noise schedule is separate data. Per-sample seeds (as EDM's generate.py): sample i with seed
s_i gets its noise from a generator seeded with s_i alone, so a sample is the same in every
trial and every batch size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``steps`` noise levels from σ_max to σ_min, then 0."""
    if steps < 1:
        raise ValueError("need at least one step")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    inv = 1.0 / rho
    sigmas = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ)) / σ. NFE = steps."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s.to(x.dtype))) / s
        x = x + (s_next - s) * d
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Alg. 1, no churn); the last step to σ = 0
    is plain Euler, so NFE = 2 · steps − 1."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s.to(x.dtype))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next.to(x.dtype))) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in σ space: a multistep second-order solver in
    t = −log σ that reuses the previous denoised estimate. NFE = steps."""
    old_denoised = None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, s.to(x.dtype))
        if s_next == 0:
            x = denoised
            break
        h = (s.log() - s_next.log()).to(x.dtype)
        d = denoised
        if old_denoised is not None:
            r = (sigmas[i - 1].log() - s.log()).to(x.dtype) / h
            d = (1 + 1 / (2 * r)) * denoised - old_denoised / (2 * r)
        x = (s_next / s).to(x.dtype) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


# diffusers' own schedulers, for DDPM-family diffusers models: NFE = steps
NATIVE_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
                     "unipc": "UniPCMultistepScheduler"}


@torch.no_grad()
def sample_native(precond, noise: torch.Tensor, steps: int, sampler: str) -> torch.Tensor:
    """Sample a diffusers DDPM-family model with one of diffusers' own schedulers, built from the
    model's scheduler config, calling its UNet directly (the skip controller sees each call)."""
    import diffusers

    config = getattr(precond, "scheduler_config", None)
    if not config:
        raise ValueError(f"sampler {sampler} needs a diffusers pipeline model (its scheduler config)")
    scheduler = getattr(diffusers, NATIVE_SCHEDULERS[sampler]).from_config(config)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = precond.unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out.sample if hasattr(out, "sample") else out, t, x).prev_sample
    return x


# name -> (function, steps for an NFE or None when impossible, NFE of a number of steps)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], int | None], Callable[[int], int]]] = {
    "heun": (sample_heun, lambda nfe: (nfe + 1) // 2 if nfe >= 1 and nfe % 2 == 1 else None,
             lambda steps: 2 * steps - 1),
    "euler": (sample_euler, lambda nfe: nfe if nfe >= 1 else None, lambda steps: steps),
    "dpmpp_2m": (sample_dpmpp_2m, lambda nfe: nfe if nfe >= 1 else None, lambda steps: steps),
    **{name: (sample_native, lambda nfe: nfe if nfe >= 1 else None, lambda steps: steps)
       for name in NATIVE_SCHEDULERS},
}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend exactly ``nfe`` evaluations; an impossible NFE lists the nearest valid."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    _, to_steps, to_nfe = SAMPLERS[sampler]
    steps = to_steps(nfe)
    if steps is None:
        valid = sorted({to_nfe(s) for s in range(1, 200)}, key=lambda v: (abs(v - nfe), v))[:2]
        raise ValueError(
            f"--nfe {nfe} is impossible for {sampler}; nearest valid: {', '.join(map(str, sorted(valid)))}"
        )
    return steps


def initial_noise(seeds: Sequence[int], shape: Sequence[int], sigma_max: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T = σ_max · ε_i, with ε_i drawn from a generator seeded with seed i alone."""
    return seeded_inputs(seeds, shape, 0)[0].to(dtype) * sigma_max


def seeded_inputs(seeds: Sequence[int], shape: Sequence[int], label_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit noise [N, *shape] and, for a class-conditional model, one-hot labels [N, label_dim]:
    sample i draws its noise, then its class, from a generator seeded with seed i alone (as
    EDM's generate.py does), so both are the same in every trial and every batch size."""
    noise = torch.empty(len(seeds), *shape)
    classes = torch.empty(len(seeds), dtype=torch.long)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        noise[i] = torch.randn(*shape, generator=gen)
        if label_dim:
            classes[i] = torch.randint(label_dim, (1,), generator=gen)
    labels = torch.nn.functional.one_hot(classes, label_dim).float() if label_dim else None
    return noise, labels


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (EDM's rounding)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class NonFiniteSamplesError(FloatingPointError):
    """The sampler produced NaN or inf (a ρ far from 1 can blow a model up)."""


def generate(
    denoiser: Denoiser,
    sampler: str,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    shape: Sequence[int],
    batch_size: int = 250,
    progress: bool | str = True,
    device: torch.device | str = "cpu",
    label_dim: int = 0,
) -> torch.Tensor:
    """uint8 images [N, C, H, W] (on the CPU) for ``seeds``, sampled on ``device`` in batches of
    ``batch_size``. The noise (and the class of a ``label_dim``-class model) is drawn on the CPU,
    so a seed gives the same sample inputs on any device."""
    fn = SAMPLERS[sampler][0]
    sigma_max = float(sigmas[0])
    chunks: list[torch.Tensor] = []
    desc = progress if isinstance(progress, str) else "sampling"
    with torch.inference_mode(), tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress,
                                      leave=False) as bar:
        for start in range(0, len(seeds), batch_size):
            batch_seeds = seeds[start : start + batch_size]
            noise, labels = seeded_inputs(batch_seeds, shape, label_dim)
            model = denoiser
            if labels is not None:  # class-conditional: the same labels at every step
                labels = labels.to(device)
                model = lambda x, sigma: denoiser(x, sigma, class_labels=labels)  # noqa: E731
            if sampler in NATIVE_SCHEDULERS:
                x = sample_native(denoiser, noise.to(device), len(sigmas) - 1, sampler)
            else:
                x = fn(model, noise.to(device) * sigma_max, sigmas)
            if not torch.isfinite(x).all():
                raise NonFiniteSamplesError(
                    f"non-finite values in samples of seeds {batch_seeds[0]}..{batch_seeds[-1]}"
                )
            chunks.append(to_uint8(x).cpu())
            bar.update(len(batch_seeds))
    return torch.cat(chunks)


def seed_range(first: int, n: int) -> list[int]:
    return list(range(first, first + n))

