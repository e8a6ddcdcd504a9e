"""Inception-v3 plumbing with a random-weight network saved to a file (checks paths, not scores)."""

import urllib.error

import numpy as np
import pytest
import torch
from torch_fidelity import feature_extractor_inceptionv3 as tfi

from skiptune_search.scoring.metrics import FeatureWeightsError, ReferenceStats, extract_features, load_extractor


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved as a plain state dict."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(torch.nn.Module.state_dict(net), path)
    return path


def test_inception_from_a_local_weights_file(inception_weights):
    ext = load_extractor("inception-v3-compat", inception_weights)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)  # grayscale is expanded to RGB
    assert extract_features(images, ext).shape == (3, 2048)


def test_inception_offline_without_weights_says_where_to_get_them(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_network)
    with pytest.raises(FeatureWeightsError, match="on a machine with internet and pass the file's path") as info:
        load_extractor("inception-v3-compat")
    assert info.value.option == "inception_weights"
    assert tfi.URL_INCEPTION_V3 in str(info.value)


class Payload:
    """Anything but a tensor: unpickling it would run code."""


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(FeatureWeightsError, match="refusing to unpickle"):
        load_extractor("inception-v3-compat", path)
    with pytest.raises(FeatureWeightsError, match="not found"):
        load_extractor("inception-v3-compat", tmp_path / "missing.pth")


def test_search_with_inception_features(inception_weights, tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 2048))
    ReferenceStats(feats.mean(0), np.cov(feats, rowvar=False), "inception-v3-compat", 64).save("ref.npz")
    base = ["search", "--model", str(tiny_model_dir), "--nfe", "1", "--n", "4", "--trials", "1", "--batch", "4",
            "--features", "inception-v3-compat"]
    runner = CliRunner()
    result = runner.invoke(main, base)
    assert result.exit_code == 2 and "--reference: the bundled statistics are" in result.output
    result = runner.invoke(main, base + ["--reference", "ref.npz", "--inception-weights", str(inception_weights)])
    assert result.exit_code == 0, result.output
    assert "baseline FID" in result.output
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    result = runner.invoke(main, base + ["--reference", "ref.npz", "--study", "other"])
    assert result.exit_code == 2 and "Inception weights unavailable offline" in result.output
