"""σ grids, samplers and seeded initial noise, in the style of k-diffusion.

Each sampler is a small function over a denoiser D(x, σ) and a list of σ ending in 0; the
noise schedule is separate data. σ reaches the denoiser as a 0-d tensor on the samples' device
and dtype, as in EDM's sampler (its Precond wrappers do not move σ). Per-sample seeds (as EDM's
generate.py): sample i with seed s_i gets its noise from a generator seeded with s_i alone, so a
sample is the same in every trial and every batch size.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..core.errors import InputError, NonFiniteSamplesError
from ..core.limits import MAX_NFE, check_int
from . import SIGMA_GRIDS, SIGMA_SAMPLERS
from .images import to_uint8

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``steps`` noise levels from σ_max to σ_min, then 0."""
    if steps < 1:
        raise InputError("need at least one step")
    if not 0 < sigma_min < sigma_max < float("inf"):
        raise InputError(f"the Karras grid needs 0 < σ_min < σ_max < inf, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    inv = 1.0 / rho
    sigmas = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def model_sigmas(steps: int, sigma_table: torch.Tensor) -> torch.Tensor:
    """The model's own discrete grid: the σ of ``steps`` of its training timesteps, evenly
    spaced from the last (σ_max) to the first (σ_min) and rounded to whole timesteps (k-diffusion's
    ``get_sigmas`` on a discrete schedule, without interpolating between timesteps), then 0.
    ``sigma_table[t]`` is the σ of training timestep t (ascending)."""
    table = torch.as_tensor(sigma_table, dtype=torch.float64).flatten().cpu()
    if not 1 <= steps <= len(table):
        raise InputError(f"the model's own σ grid has {len(table)} timesteps; cannot take {steps} steps on it",
                         option="nfe")
    timesteps = torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.cat([table[timesteps], torch.zeros(1, dtype=torch.float64)])


def sigma_grid(name: str, steps: int, sigma_min: float, sigma_max: float,
               sigma_table: torch.Tensor | None = None, model: str = "this model") -> torch.Tensor:
    """σ grid ``name`` for ``steps`` steps: 'karras' (ρ = 7 from σ_max to σ_min) or 'model' (the
    model's own discrete timesteps; only models trained on discrete timesteps have one)."""
    if name == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max)
    if name == "model":
        if sigma_table is None:
            raise InputError(f"{model} is continuous in σ (EDM preconditioning) and has no discrete σ grid of "
                             f"its own; use the karras grid", option="sigma_grid")
        return model_sigmas(steps, sigma_table)
    raise InputError(f"unknown σ grid {name!r}; choose one of {', '.join(SIGMA_GRIDS)}", option="sigma_grid")


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ)) / σ. NFE = steps."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s.to(x))) / s
        x = x + (s_next - s) * d
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Alg. 1, no churn); the last step to σ = 0
    is plain Euler, so NFE = 2 · steps − 1."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s.to(x))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next.to(x))) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in σ space: a multistep second-order solver in
    t = −log σ that reuses the previous denoised estimate. NFE = steps."""
    old_denoised = None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, s.to(x))
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


# name -> (function, steps for an NFE or None when impossible, NFE of a number of steps)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], int | None], Callable[[int], int]]] = {
    "heun": (sample_heun, lambda nfe: (nfe + 1) // 2 if nfe >= 1 and nfe % 2 == 1 else None,
             lambda steps: 2 * steps - 1),
    "euler": (sample_euler, lambda nfe: nfe if nfe >= 1 else None, lambda steps: steps),
    "dpmpp_2m": (sample_dpmpp_2m, lambda nfe: nfe if nfe >= 1 else None, lambda steps: steps),
}
assert tuple(SAMPLERS) == SIGMA_SAMPLERS, "sampling/__init__.py lists the samplers by name for the CLI"


def default_sigma_grid(sampler: str) -> str:
    """'karras' for the σ-space samplers, 'model' for diffusers' schedulers (they step on the
    model's timesteps)."""
    return "karras" if sampler in SIGMA_SAMPLERS else "model"


def check_sigma_grid(sampler: str, grid: str) -> None:
    """A σ grid the sampler can step on; a one-line error otherwise."""
    if grid not in SIGMA_GRIDS:
        raise InputError(f"unknown σ grid {grid!r}; choose one of {', '.join(SIGMA_GRIDS)}", option="sigma_grid")
    if sampler not in SIGMA_SAMPLERS and grid != "model":
        raise InputError(f"sampler {sampler} steps on its scheduler's own timesteps: use the model σ grid, "
                         f"or a σ-space sampler (heun, euler, dpmpp_2m) on the Karras grid", option="sigma_grid")


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps of σ-space sampler ``sampler`` that spend exactly ``nfe`` evaluations; an impossible
    NFE lists the nearest valid. (A diffusers scheduler's steps come from the scheduler itself:
    ``models.pipelines.scheduler_steps_for_nfe``.)"""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown σ-space sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}",
                         option="sampler")
    _, to_steps, to_nfe = SAMPLERS[sampler]
    nfe = check_int(nfe, "nfe", 1, MAX_NFE)
    steps = to_steps(nfe)
    if steps is None:
        # to_nfe grows with the steps: the first step count reaching nfe, and its neighbours
        low, high = 1, nfe
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if to_nfe(mid) >= nfe else (mid + 1, high)
        raise impossible_nfe(sampler, nfe, [to_nfe(s) for s in range(max(1, low - 2), low + 3)])
    return steps


def impossible_nfe(sampler: str, nfe: int, counts: Sequence[int]) -> InputError:
    """The error for an NFE no step count of ``sampler`` spends, naming the two nearest that one
    does (``counts``: NFEs it can spend, around ``nfe``) within the NFE bound."""
    valid = sorted(sorted({c for c in counts if 1 <= c <= MAX_NFE}, key=lambda v: (abs(v - nfe), v))[:2])
    if not valid:
        return InputError(f"NFE {nfe} is impossible for {sampler}: no step count of it spends that many model calls; "
                          f"choose another sampler", option="nfe")
    return InputError(f"NFE {nfe} is impossible for {sampler}; nearest valid: {', '.join(map(str, valid))}",
                      option="nfe")


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


def generate_batches(
    denoiser: Denoiser,
    sampler: str,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    shape: Sequence[int],
    batch_size: int = 250,
    progress: bool | str = True,
    device: torch.device | str = "cpu",
    label_dim: int = 0,
    autocast: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 images [B, C, H, W] (on the CPU) for ``seeds``, one batch of ``batch_size`` at a time,
    sampled on ``device``. The noise (and the class of a ``label_dim``-class model) is drawn on the
    CPU, so a seed gives the same sample inputs on any device. A latent model (a denoiser with
    ``decode``, as EDM2's img512 models) has its latents decoded into images. With ``autocast`` (a
    dtype), the model runs under torch.autocast in it; the sampler's own updates stay fp32."""
    fn = SAMPLERS[sampler][0]
    decode = getattr(denoiser, "decode", None)
    sigma_max = float(sigmas[0])
    desc = progress if isinstance(progress, str) else "sampling"
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(seeds), batch_size):
            batch_seeds = seeds[start : start + batch_size]
            # per batch: a mode held across the yield would leak to the caller
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=autocast,
                                                        enabled=autocast is not None):
                noise, labels = seeded_inputs(batch_seeds, shape, label_dim)
                # a class-conditional model's labels, the same at every step
                labels = None if labels is None else labels.to(device)
                model = denoiser if labels is None else (
                    lambda x, sigma: denoiser(x, sigma, class_labels=labels))  # noqa: E731
                x = fn(model, noise.to(device) * sigma_max, sigmas)
                if not torch.isfinite(x).all():
                    raise NonFiniteSamplesError(
                        f"non-finite values in samples of seeds {batch_seeds[0]}..{batch_seeds[-1]}"
                    )
                if decode is not None:
                    x = decode(x)
                images = to_uint8(x).cpu()
            bar.update(len(batch_seeds))
            yield images


def generate(denoiser: Denoiser, sampler: str, sigmas: torch.Tensor, seeds: Sequence[int], shape: Sequence[int],
             batch_size: int = 250, progress: bool | str = True, device: torch.device | str = "cpu",
             label_dim: int = 0, autocast: torch.dtype | None = None) -> torch.Tensor:
    """All the images of ``generate_batches`` in one uint8 tensor [N, C, H, W]."""
    return torch.cat(list(generate_batches(denoiser, sampler, sigmas, seeds, shape, batch_size, progress, device,
                                           label_dim, autocast)))

