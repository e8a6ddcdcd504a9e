"""Stand-ins for NVlabs/edm's networks (training/networks.py), written here for the tests.

Same class names and module structure as EDM's, which is all the adapter relies on: ``enc`` and
``dec`` ModuleDicts keyed '{res}x{res}_...', UNetBlock with GroupNorm ``norm0``, ``conv0``,
``norm1``, ``conv1`` and a 1x1 ``skip`` conv when the channel count or resolution changes, and a
decoder that concatenates ``skips.pop()`` to x before any block whose ``in_channels`` differ.
Layers are plain torch ones (no custom resampling filters or init): enough to run, not to train.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """EDM's rule: 32 groups, but at least 4 channels per group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-5)


class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * 2)
        self.norm1 = group_norm(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if (in_channels != out_channels or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        orig = x
        x = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb).unsqueeze(2).unsqueeze(3).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(x)
        x = x + (self.skip(self._resample(orig)) if self.skip is not None else orig)
        x = x * np.sqrt(0.5)
        if self.attention:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, c, h * w).unbind(1)
            a = torch.softmax(q.transpose(1, 2) @ k / np.sqrt(c), dim=-1)
            x = (x + self.proj((v @ a.transpose(1, 2)).reshape(b, c, h, w))) * np.sqrt(0.5)
        return x


class DownConv(nn.Module):
    """EDM's Conv2d with down=True: halve the resolution, then a conv (none for kernel 0)."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2) if kernel else None

    def forward(self, x):
        x = F.avg_pool2d(x, 2)
        return self.conv(x) if self.conv is not None else x


class _EDMUNet(nn.Module):
    """The shared skeleton of SongUNet and DhariwalUNet (standard decoder). SongUNet's encoder
    may add an auxiliary path from the input image ('skip' or 'residual', as NCSN++): entries named
    '*_aux_*' that fold into the last skip of each level instead of adding one."""

    def __init__(self, img_resolution, in_channels, out_channels, model_channels, channel_mult,
                 num_blocks, attn_resolutions, first_conv_mult, label_dim=0, encoder_type="standard"):
        super().__init__()
        emb = model_channels * 4
        self.model_channels, self.img_resolution, self.label_dim = model_channels, img_resolution, label_dim
        self.map_label = nn.Linear(label_dim, model_channels) if label_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * (mult if first_conv_mult else 1)
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cin, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb, down=True)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = DownConv(caux, caux, kernel=0)
                    self.enc[f"{res}x{res}_aux_skip"] = nn.Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = DownConv(caux, cout, kernel=3)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        self.out_norm = group_norm(cout)
        self.out_conv = nn.Conv2d(cout, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        half = self.model_channels // 2
        freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angle = noise_labels.float().reshape(-1, 1) * freqs.reshape(1, -1)
        emb = torch.cat([angle.cos(), angle.sin()], dim=1)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class SongUNet(_EDMUNet):
    """DDPM++ layout (EDM's CIFAR-10 net): first conv at model_channels, attention at 16x16."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, model_channels=128,
                 channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), label_dim=0, encoder_type="standard"):
        super().__init__(img_resolution, in_channels, out_channels, model_channels, channel_mult,
                         num_blocks, attn_resolutions, first_conv_mult=False, label_dim=label_dim,
                         encoder_type=encoder_type)


class DhariwalUNet(_EDMUNet):
    """ADM layout (EDM's ImageNet-64 net): first conv at model_channels * mult[0]."""

    def __init__(self, img_resolution=64, in_channels=3, out_channels=3, model_channels=192,
                 channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), label_dim=0):
        super().__init__(img_resolution, in_channels, out_channels, model_channels, channel_mult,
                         num_blocks, attn_resolutions, first_conv_mult=True, label_dim=label_dim)


class EDMPrecond(nn.Module):
    """EDM's wrapper: D(x, σ) = c_skip x + c_out F(c_in x, ln(σ)/4); the net lives at .model."""

    def __init__(self, model, sigma_data=0.5, sigma_min=0, sigma_max=float("inf")):  # EDM's defaults
        super().__init__()
        self.model, self.sigma_data = model, sigma_data
        self.sigma_min, self.sigma_max, self.label_dim = sigma_min, sigma_max, model.label_dim
        self.img_resolution = model.img_resolution
        self.img_channels = model.out_conv.out_channels

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)  # as EDM's: on whatever device σ came
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        f = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * f
