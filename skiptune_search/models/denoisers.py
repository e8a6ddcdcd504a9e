"""Models as denoisers D(x, σ) in EDM's σ-space (Karras et al. 2022, Table 1)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError, ModelLoadError
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
            raise ModelLoadError(f"unsupported prediction_type {prediction_type!r}: the model predicts neither "
                                 f"epsilon, v_prediction nor sample")
        self.unet = unet
        self.prediction_type = prediction_type
        self.scheduler_config = dict(scheduler_config or {})  # for sampling with diffusers' own schedulers
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

    def unet_output(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's raw prediction (ε, v or x0) for a VP-scaled input at ``timestep``."""
        out = self.unet(x, timestep)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in = 1 / (1 + s**2).sqrt()
        # the timestep stays float32 (bf16 would round 999 to 1000); the UNet embeds it in float32
        out = self.unet_output(x * c_in, self.timestep(sigma).float(), **cond)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in**2 * x - s * c_in * out
        return out


class TextCFGPrecond(DiffusersVPPrecond):
    """A text-to-image latent diffusion model (Stable Diffusion style: a UNet2DConditionModel, a
    CLIP text encoder and tokenizer, an AutoencoderKL) as D(z, σ) in latent σ-space.

    Classifier-free guidance on the UNet's prediction: out = out(∅) + g · (out(c) − out(∅)),
    both halves from ONE UNet call on the batch [∅, c] (one call on c alone when g = 1). Prompt
    embeddings are encoded once per prompt and cached, not at every step; ``decode`` turns
    latents into images in [-1, 1] through the VAE.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                 scheduler_config: dict, text_encoder: nn.Module, tokenizer, vae: nn.Module) -> None:
        super().__init__(unet, alphas_cumprod, prediction_type, scheduler_config)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.prompts: list[str] = []
        self.guidance = 1.0
        self._embeddings: dict[int, torch.Tensor] = {}  # prompt index -> [tokens, dim]
        self._empty: torch.Tensor | None = None  # the empty prompt's embedding (the ∅ of guidance)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def set_prompts(self, prompts: list[str], guidance: float) -> None:
        """Use these prompts (index = line) and guidance scale from now on."""
        self.prompts, self.guidance = list(prompts), float(guidance)
        self._embeddings.clear()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP embeddings [len(texts), tokens, dim] of padded, truncated prompts."""
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.log_sigmas.device))[0]

    def condition(self, prompt_index: list[int]) -> dict:
        """The prompt embeddings of a batch (``prompt_index`` per sample), for every step of it;
        prompts not seen before are encoded in one text-encoder call."""
        missing = sorted(set(prompt_index) - self._embeddings.keys())
        if missing:
            for i, emb in zip(missing, self.encode_text([self.prompts[i] for i in missing])):
                self._embeddings[i] = emb
        return {"prompt_embeds": torch.stack([self._embeddings[i] for i in prompt_index])}

    def unet_output(self, x: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor | None = None):
        if prompt_embeds is None:
            raise InputError("a text-conditional model needs prompts (a file, one per line)", option="prompts")
        if self.guidance == 1.0:  # no guidance: the conditional prediction alone
            return self.unet(x, timestep, encoder_hidden_states=prompt_embeds).sample
        if self._empty is None:
            self._empty = self.encode_text([""])
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        both = self.unet(torch.cat([x, x]), timestep.repeat(2) if timestep.numel() > 1 else timestep,
                         encoder_hidden_states=torch.cat([self._empty.expand_as(prompt_embeds), prompt_embeds])).sample
        uncond, cond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Images in [-1, 1] of latents: the VAE decoder on latents / scaling_factor, in chunks."""
        scale = self.vae.config.scaling_factor
        images = [self.vae.decode(z / scale).sample for z in latents.split(chunk)]
        return torch.cat(images).clamp(-1, 1)
