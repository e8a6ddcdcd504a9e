"""Models as denoisers D(x, σ) in EDM's σ-space (Karras et al. 2022, Table 1)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.interp import bracket, interp


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
    t = torch.as_tensor(timestep, dtype=torch.float64, device=log_sigmas.device)
    steps = torch.arange(len(log_sigmas), dtype=torch.float64, device=log_sigmas.device)
    return interp(steps, log_sigmas, t).exp()


def timestep_to_sigma_from_scheduler(scheduler) -> "callable":
    """σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) of a diffusers scheduler with a DDPM noise schedule
    (``alphas_cumprod``: DDPM, DDIM, DPM-Solver, UniPC, Euler, Heun, ...), interpolated in log σ
    between integer timesteps: the inverse of how Euler-type schedulers turn their σ into the
    fractional timesteps they pass to the UNet. The table is copied once to each device asked."""
    log_sigmas = _log_sigma_table(scheduler.alphas_cumprod)
    tables: dict[torch.device, torch.Tensor] = {}

    def to_sigma(timestep) -> torch.Tensor:
        timestep = torch.as_tensor(timestep)
        if timestep.device not in tables:
            tables[timestep.device] = log_sigmas.to(timestep.device)
        return _sigma_at(tables[timestep.device], timestep)

    return to_sigma


class DiffusersVPPrecond(nn.Module):
    """A DDPM-family diffusers UNet (ε-, v- or sample-prediction) as D(x, σ) in EDM's σ-space.

    The VP model sees x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε, i.e. x_σ / sqrt(1 + σ²) for
    σ = sqrt((1 − ᾱ)/ᾱ); its timestep is found by interpolating the scheduler's σ table in log σ.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelLoadError(f"unsupported prediction_type {prediction_type!r}: the model predicts neither "
                                 f"epsilon, v_prediction nor sample")
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("log_sigmas", _log_sigma_table(alphas_cumprod), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep whose σ is ``sigma`` (linear in log σ between integers)."""
        k, w = bracket(self.log_sigmas, sigma.double().log())
        return (k - 1) + w

    def sigma_from_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a (possibly fractional) timestep: the σ table interpolated in log σ."""
        return _sigma_at(self.log_sigmas, timestep)

    @property
    def sigma_table(self) -> torch.Tensor:
        """σ of each training timestep (index t), ascending: the model's own discrete grid."""
        return self.log_sigmas.exp()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in = 1 / (1 + s**2).sqrt()
        # the timestep stays float32 (bf16 would round 999 to 1000); the UNet embeds it in float32
        out = self.unet(x * c_in, self.timestep(sigma).float(), **cond).sample  # the raw ε, v or x0
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in**2 * x - s * c_in * out
        return out
