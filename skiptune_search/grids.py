"""Sample grids as PNG files, written atomically."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write uint8 images [N, C, H, W] as one PNG grid (``nrow`` per row, default √N)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, round(math.sqrt(len(images))))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        save_image(images.float().div(255), tmp, nrow=nrow, padding=2, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
