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



def _log_sigma_table(alphas_cumprod) -> torch.Tensor:
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas) / alphas).sqrt().log()


def _sigma_at(log_sigmas: torch.Tensor, timestep) -> torch.Tensor:
    """σ of a (possibly fractional) timestep: the table interpolated in log σ."""
    t = torch.as_tensor(timestep, dtype=torch.float64, device=log_sigmas.device).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(log_sigmas) - 1)
    return (log_sigmas[lo] + (t - lo) * (log_sigmas[hi] - log_sigmas[lo])).exp()


def timestep_to_sigma_from_scheduler(scheduler) -> "callable":
    """σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) of a diffusers DDPM-family scheduler (DDPM, DDIM, ...),
    interpolated in log σ between integer timesteps."""
    log_sigmas = _log_sigma_table(scheduler.alphas_cumprod)
    return lambda t: _sigma_at(log_sigmas, t)


class DiffusersVPPrecond(nn.Module):
    """A DDPM-family diffusers UNet (ε-, v- or sample-prediction) as D(x, σ) in EDM's σ-space.

    The VP model sees x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε, i.e. x_σ / sqrt(1 + σ²) for
    σ = sqrt((1 − ᾱ)/ᾱ); its timestep is found by interpolating the scheduler's σ table in log σ.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 scheduler_config: dict | None = None) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.scheduler_config = dict(scheduler_config or {})  # for sampling with diffusers' own schedulers
        self.register_buffer("log_sigmas", _log_sigma_table(alphas_cumprod), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep whose σ is ``sigma`` (linear in log σ between integers)."""
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_val, hi_val = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return (hi - 1) + (log_sigma - lo_val) / (hi_val - lo_val)

    def sigma_from_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a (possibly fractional) timestep: the σ table interpolated in log σ."""
        return _sigma_at(self.log_sigmas, timestep)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in = 1 / (1 + s**2).sqrt()
        out = self.unet(x * c_in, self.timestep(sigma).to(x.dtype))
        out = out.sample if hasattr(out, "sample") else out
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in**2 * x - s * c_in * out
        return out
