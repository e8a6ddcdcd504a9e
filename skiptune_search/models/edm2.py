"""EDM2 networks (NVlabs/edm2): a pickle's ``ema`` Precond, sampled as EDM2's generate_images.py does.

EDM2 pickles hold ``{'ema': Precond, 'encoder': ...}`` (read by ``loaders.load_edm_pickle``, behind
the same trust and code-path checks as EDM's). The Precond already is a denoiser D(x, σ, labels)
with EDM's c_noise = ln(σ)/4; it records no σ range, so sampling spans generate_images.py's
defaults, σ from 0.002 to 80, with one-hot class labels. The encoder decides what the samples are:
none or a ``StandardRGBEncoder`` means pixels in [-1, 1] (decoded as this tool decodes every
model); a ``StabilityVAEEncoder`` (the img512 models) means 4-channel latents, decoded as EDM2
does: the encoder's per-channel affine map undone, then the Stability VAE, its output clamped to
[0, 1] and truncated to uint8. EDM2 downloads that VAE when it is missing; here it comes from the
local caches only (Hugging Face's, or the one EDM2's own loader fills), or a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.adapters import is_edm2_unet
from ..core.errors import ModelLoadError

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM2's generate_images.py (edm_sampler's defaults)


def is_edm2_precond(net) -> bool:
    """An EDM2 Precond: its network at ``.unet`` is EDM2's UNet."""
    return isinstance(net, nn.Module) and isinstance(getattr(net, "unet", None), nn.Module) and is_edm2_unet(net.unet)


def edm2_vae_cache() -> Path:
    """Where EDM2's own loader caches diffusers models (dnnlib's cache folder + 'diffusers')."""
    root = os.environ.get("DNNLIB_CACHE_DIR") or Path(os.environ.get("HOME", "~")).expanduser() / ".cache" / "dnnlib"
    return Path(root) / "diffusers"


def find_vae(name: str, model: str) -> Path:
    """The folder of the VAE ``name``: a local folder of that name, or its snapshot in the local
    Hugging Face cache or EDM2's; nothing is downloaded."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import try_to_load_from_cache

    for cache in (None, edm2_vae_cache()):
        try:
            hit = try_to_load_from_cache(name, "config.json", cache_dir=cache)
        except ValueError:  # not a repo id
            break
        if isinstance(hit, str):
            return Path(hit).parent
    raise ModelLoadError(
        f"{model} is a latent EDM2 model decoded by the VAE {name}, which is in neither the local Hugging Face "
        f"cache nor EDM2's ({edm2_vae_cache()}); on a machine with internet run: hf download {name}")


class EDM2Latent(nn.Module):
    """An EDM2 latent model: its Precond at ``.net`` (called as it is) and the decoder of its latents."""

    def __init__(self, net: nn.Module, vae: nn.Module, scale, bias, batch_size: int = 8) -> None:
        super().__init__()
        self.net = net
        self.vae = vae
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float32)).reshape(1, -1, 1, 1))
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias, np.float32)).reshape(1, -1, 1, 1))
        self.batch_size = max(1, int(batch_size))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, sigma, class_labels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 images of latents, as EDM2's StabilityVAEEncoder.decode: in float32 (no autocast)."""
        with torch.autocast(latents.device.type, enabled=False):
            raw = (latents.float() - self.bias) / self.scale
            images = torch.cat([self.vae.decode(z).sample for z in raw.split(self.batch_size)])
        return images.clamp(0, 1).mul(255).to(torch.uint8)


def _load_vae(name: str, model: str) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = find_vae(name, model)
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model}: the VAE {name} at {folder} could not be read ({str(exc).splitlines()[0][:160]}); "
                             f"on a machine with internet run: hf download {name}") from None
    return vae.eval().requires_grad_(False)


def load_edm2(path: Path, net: nn.Module, data) -> tuple[nn.Module, dict]:
    """The denoiser and info of an unpickled EDM2 network ``net`` (``data``: the whole pickle)."""
    encoder = data.get("encoder") if isinstance(data, dict) else None
    info = {"name": str(path), "precond": "edm2", "resolution": int(net.img_resolution),
            "channels": int(net.img_channels), "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
            "label_dim": int(getattr(net, "label_dim", 0) or 0)}
    net = net.eval().requires_grad_(False)
    if encoder is None or type(encoder).__name__ == "StandardRGBEncoder":
        return net, info  # pixels in [-1, 1]: EDM2 decodes them as to_uint8 does
    missing = [a for a in ("vae_name", "scale", "bias") if not hasattr(encoder, a)]
    if missing:
        raise ModelLoadError(f"{path}: its encoder {type(encoder).__name__} is neither EDM2's StandardRGBEncoder nor "
                             f"its StabilityVAEEncoder (no {', '.join(missing)}); only those two are supported")
    vae = _load_vae(str(encoder.vae_name), str(path))
    denoiser = EDM2Latent(net, vae, encoder.scale, encoder.bias, getattr(encoder, "batch_size", 8))
    info["image_resolution"] = info["resolution"] * 2 ** (len(vae.config.block_out_channels) - 1)
    return denoiser, info
