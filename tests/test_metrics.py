import numpy as np
import pytest
import torch
from scipy import linalg

from skiptune_search.metrics import (
    DEFAULT_REFERENCE, ReferenceStats, ReferenceStatsError, extract_features, fid_from_features, load_extractor,
)


def scipy_frechet(f1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Independent Fréchet distance with scipy's sqrtm."""
    mu1, sigma1 = f1.mean(0), np.cov(f1, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    ref_feats = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    gen_feats = rng.normal(0.3, 1.2, size=(300, 16)) @ rng.normal(size=(16, 16))
    ref = ReferenceStats.from_features(torch.from_numpy(ref_feats), "test")
    ours = fid_from_features(torch.from_numpy(gen_feats), ref)
    theirs = scipy_frechet(gen_feats, ref.mu, ref.sigma)
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert fid_from_features(torch.from_numpy(ref_feats), ref) == pytest.approx(0.0, abs=1e-6)


def test_fid_on_real_extractor_features_matches_scipy():
    ext = load_extractor()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    b = (a.float() * 0.5).to(torch.uint8)
    fa, fb = extract_features(a, ext).numpy(), extract_features(b, ext).numpy()
    assert fa.shape == (40, 1280)
    ref = ReferenceStats.from_features(torch.from_numpy(fb), "efficientnet-lite0")
    assert fid_from_features(torch.from_numpy(fa), ref) == pytest.approx(
        scipy_frechet(fa, ref.mu, ref.sigma), rel=1e-3)


def test_extractor_loads_the_imagenet_weights():
    """Pretrained weights, not random ones: a constant image gives the same features twice and
    BatchNorm statistics come from the file (running_var is not all ones)."""
    ext = load_extractor()
    bn = ext.net._bn0
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    x = torch.full((2, 3, 28, 28), 128, dtype=torch.uint8)
    f = ext(x)[0]
    assert torch.equal(f[0], f[1]) and f.shape == (2, 1280)


def test_bundled_reference_statistics():
    ref = ReferenceStats.load(DEFAULT_REFERENCE)
    assert ref.mu.shape == (1280,) and ref.sigma.shape == (1280, 1280)
    assert ref.features == "efficientnet-lite0" and ref.n == 10000
    assert np.allclose(ref.sigma, ref.sigma.T)


def test_reference_round_trip_and_errors(tmp_path):
    ref = ReferenceStats(np.arange(3.0), np.eye(3), "x", 7)
    back = ReferenceStats.load(ref.save(tmp_path / "r.npz"))
    assert np.array_equal(back.mu, ref.mu) and back.n == 7 and back.features == "x"
    with pytest.raises(ReferenceStatsError, match="reference-stats"):
        ReferenceStats.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ReferenceStatsError, match="not a reference-statistics"):
        ReferenceStats.load(tmp_path / "bad.npz")
