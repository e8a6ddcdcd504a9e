"""Stand-ins for NVlabs/edm2's network (training/networks_edm2.py) and encoders
(training/encoders.py), written here for the tests from reading the public code.

What the adapter and the loader rely on is kept: class names (``Precond`` holding ``.unet``, a
``UNet`` with ``enc`` and ``dec`` ModuleDicts keyed '{res}x{res}_...', ``Block`` with ``conv_res0``
and a 1x1 ``conv_skip`` where channels change, ``MPConv`` with ``out_channels``), the encoder
saving every ``enc`` output, and a decoder that runs ``x = mp_cat(x, skips.pop())`` before each
entry whose name contains 'block', with no normalization at a decoder block's input. The
magnitude-preserving pieces follow the paper's equations; resampling is a plain average pool or
nearest-neighbour copy instead of EDM2's filters. Enough to run, not to train.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def normalize(x, dim=None, eps=1e-4):
    """x divided by its RMS over ``dim`` (all but the batch by default)."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    rms = eps + norm * np.sqrt(norm.numel() / x.numel())
    return x / rms.to(x.dtype)


def mp_silu(x):
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, dim=1, t=0.5):
    """cat([a, b]) with weights that keep the magnitude; ``t`` moves weight from a to b."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = np.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / np.sqrt(na)), b * (scale * t / np.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        angle = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (angle.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """A conv (kernel [k, k]) or linear layer (kernel []) whose weight is normalized at each call."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = normalize(self.weight.float())
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 attention=False, channels_per_head=8, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def _resample(self, x):
        if self.resample_mode == "down":
            return F.avg_pool2d(x, 2)
        if self.resample_mode == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        x = self._resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: encoder blocks only
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.conv_res1(mp_silu(y * c[:, :, None, None].to(y.dtype)))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            qkv = normalize(self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w), dim=2)
            q, k, v = qkv.unbind(3)
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(b, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=16, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(), label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        emb = max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(widths[0])
        self.emb_noise = MPConv(widths[0], emb, [])
        self.emb_label = MPConv(label_dim, emb, []) if label_dim else None
        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant channel
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb, "enc", attention=res in attn_resolutions,
                                                            **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, emb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, emb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, emb, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb, "dec", attention=res in attn_resolutions,
                                                            **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(nn.Module):
    """EDM2's wrapper: D(x, σ) = c_skip x + c_out F(c_in x, ln(σ)/4, labels); the net is ``.unet``.
    It records no σ range (EDM2's generate_images.py samples σ from 0.002 to 80)."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                 logvar_channels=8, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.float()
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.float().reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        f = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        d = c_skip * x + c_out * f.float()
        if return_logvar:
            return d, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return d


class StandardRGBEncoder:
    """Pixels in [-1, 1]; decoding to uint8 as EDM2 does it."""

    def init(self, device):
        pass

    def decode(self, x):
        return (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)


class StabilityVAEEncoder:
    """The latent encoder object of EDM2's img512 pickles: the VAE's name and the per-channel affine
    map between raw VAE latents and the model's latents; the VAE itself is never pickled."""

    def __init__(self, vae_name="stabilityai/sd-vae-ft-mse", raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)
