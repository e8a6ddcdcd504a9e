import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the Fashion-MNIST format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped data folder with 64 train and 32 test images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


@pytest.fixture
def tiny_unet():
    """A small random UNet2DModel with the bundled architecture's structure."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_unet) -> Path:
    """A model folder as train-default writes it, holding the tiny random UNet."""
    from skiptune_search.zoo import save_model_dir

    out = tmp_path / "tiny-model"
    save_model_dir(tiny_unet, out, training={"steps": 0})
    return out
