"""Models as denoisers D(x, σ) in EDM's σ-space (Karras et al. 2022, Table 1)."""

from __future__ import annotations

import torch
from torch import nn


class EDMPrecond(nn.Module):
    """EDM preconditioning around a raw network F: D(x, σ) = c_skip x + c_out F(c_in x, c_noise).

    ``net`` is any module called as ``net(x, c_noise)`` that returns a tensor or an object
    with ``.sample`` (a diffusers ``UNet2DModel``); c_noise = ln(σ)/4 as in EDM.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        s = sigma.reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1.0 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        out = self.net(c_in * x, c_noise)
        out = out.sample if hasattr(out, "sample") else out
        return c_skip * x + c_out * out

    @staticmethod
    def sigma_from_timestep(timestep: torch.Tensor) -> torch.Tensor:
        """Invert c_noise = ln(σ)/4: the σ a raw-network call was made at."""
        return torch.exp(4 * timestep)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's λ(σ) = (σ² + σ_d²) / (σ σ_d)², which gives the network unit-variance targets."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def edm_training_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's log-normal training noise levels: ln σ ~ N(P_mean, P_std²)."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator))



def timestep_to_sigma_from_scheduler(scheduler) -> "callable":
    """σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) of a diffusers DDPM-family scheduler (DDPM, DDIM, ...),
    interpolated linearly between integer timesteps."""
    alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    sigmas = ((1 - alphas) / alphas).sqrt()

    def to_sigma(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(sigmas) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(sigmas) - 1)
        w = t - lo
        return sigmas[lo] * (1 - w) + sigmas[hi] * w

    return to_sigma
