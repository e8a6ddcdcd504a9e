"""Fashion-MNIST from the IDX ``.gz`` files of Debian's ``dataset-fashion-mnist`` package."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..core.errors import DataNotFoundError, InputError
from ..core.files import open_input

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "SKIPTUNE_FASHION_MNIST"
MAX_GZ_BYTES = 64 << 20  # Fashion-MNIST's largest file is 26 MB packed, 47 MB unpacked
MAX_IDX_BYTES = 256 << 20
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder to read: the argument, else $SKIPTUNE_FASHION_MNIST, else Debian's path."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Parse one gzipped IDX file (magic 0x0000 0x08 ndim, big-endian sizes, uint8 data)."""
    with open_input(path, "Fashion-MNIST file", max_bytes=MAX_GZ_BYTES, error=InputError, option="data_dir") as handle:
        try:
            with gzip.GzipFile(fileobj=handle) as f:
                raw = f.read(MAX_IDX_BYTES + 1)  # bounded: a gzip bomb stops here
        except (OSError, EOFError) as exc:
            raise InputError(f"{path} is not a readable .gz file ({exc}); install the data again",
                             option="data_dir") from None
    if len(raw) > MAX_IDX_BYTES or len(raw) < 4 + 4 * expected_dims:
        raise InputError(f"{path} holds {'over ' if len(raw) > MAX_IDX_BYTES else ''}{len(raw):,} bytes once "
                         f"unpacked, not a Fashion-MNIST IDX file; install the data again", option="data_dir")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise InputError(f"{path} is not a uint8 IDX file with {expected_dims} dimensions")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 28, 28] and labels as uint8 [N] of the 'train' or 'test' split."""
    if split not in _FILES:
        raise InputError(f"unknown split {split!r}; use 'train' or 'test'")
    folder = resolve_data_dir(data_dir)
    image_file, label_file = (folder / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.exists():
            raise DataNotFoundError(
                f"Fashion-MNIST file {path} not found: install it with "
                f"'apt-get install dataset-fashion-mnist', or point the data folder or "
                f"${DATA_DIR_ENV} at a folder holding the IDX .gz files", option="data_dir"
            )
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1)
    if len(images) != len(labels):
        raise InputError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels
