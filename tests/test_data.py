import numpy as np
import pytest

from skiptune_search.bundled.data import DEFAULT_DATA_DIR, DataNotFoundError, load_fashion_mnist


def test_reads_idx_files(tiny_fashion_dir):
    images, labels = load_fashion_mnist("train", tiny_fashion_dir)
    assert images.shape == (64, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (64,)
    test_images, _ = load_fashion_mnist("test", tiny_fashion_dir)
    assert test_images.shape == (32, 28, 28)


def test_environment_variable_points_at_data(tiny_fashion_dir, monkeypatch):
    monkeypatch.setenv("SKIPTUNE_FASHION_MNIST", str(tiny_fashion_dir))
    assert load_fashion_mnist("test")[0].shape == (32, 28, 28)


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_truncated_file_is_an_error(tiny_fashion_dir):
    import gzip

    path = tiny_fashion_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", tiny_fashion_dir)


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28)
    assert set(np.unique(labels)) == set(range(10))
