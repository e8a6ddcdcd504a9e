"""A stand-in for baofff/U-ViT's network (libs/uvit.py), written here for the tests from reading
the public code.

Kept: the class ``UViT(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
qkv_bias, qk_scale, norm_layer, mlp_time_embed, num_classes, use_checkpoint, conv, skip)`` and its
module names (``patch_embed``, ``time_embed``, ``label_emb``, ``pos_embed``, ``in_blocks``,
``mid_block``, ``out_blocks``, ``norm``, ``decoder_pred``, ``final_layer``); ``forward(x,
timesteps, y=None)`` with the time token (and label token) in front of the patch tokens; each
``in_blocks`` output saved, each ``out_blocks`` entry called ``blk(x, skips.pop())`` and
starting with ``skip_linear(cat([x, skip], dim=-1))``. Imports torch only (the real file needs
einops and the repo's libs/timm.py); attention is torch's scaled_dot_product_attention.
"""

import math

import torch
from torch import nn


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps: [cos, sin] of t at dim/2 frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    angle = timesteps[:, None].float() * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def patchify(images, p):
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, channels):
    b, n, d = tokens.shape
    p, side = int(math.isqrt(d // channels)), int(math.isqrt(n))
    x = tokens.reshape(b, side, side, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, side * p, side * p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, skip=False, use_checkpoint=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x, skip=None):
        if self.use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False, num_classes=-1,
                 use_checkpoint=False, conv=True, skip=True):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_classes, self.in_chans = num_classes, in_chans
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
                           if mlp_time_embed else nn.Identity())
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.extras + num_patches, embed_dim))

        def block(with_skip=False):
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, norm_layer=norm_layer, skip=with_skip,
                         use_checkpoint=use_checkpoint)

        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])
        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def forward(self, x, timesteps, y=None):
        x = self.patch_embed(x)
        n_patches = x.shape[1]
        tokens = [self.time_embed(timestep_embedding(timesteps, self.embed_dim))[:, None]]
        if y is not None:
            tokens.insert(0, self.label_emb(y)[:, None])
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))
        assert x.shape[1] == self.extras + n_patches
        return self.final_layer(unpatchify(x[:, self.extras:], self.in_chans))
