"""Samples as images: uint8 conversion, and PNG grids written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..core.files import atomic_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (EDM's rounding); uint8 images (a decoder that
    makes its own, as EDM2's VAE decoding) pass as they are."""
    if x.dtype == torch.uint8:
        return x
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write uint8 images [N, C, H, W] as one PNG grid (``nrow`` per row, default √N)."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, round(math.sqrt(len(images))))
    with atomic_path(path, suffix=".png") as tmp:
        save_image(images.float().div(255), tmp, nrow=nrow, padding=2, format="png")
    return Path(path)


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (a diffusers pipeline's tensor output) -> uint8 on the CPU, rounded as the
    pipeline's own PIL and NumPy-to-PIL output rounds them: round(255 x)."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
