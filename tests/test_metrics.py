import numpy as np
import pytest
import torch
from scipy import linalg

from skiptune_search.scoring.metrics import (
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


@pytest.mark.parametrize("n", [2, 30, 255, 256, 400])
def test_fid_is_torch_fidelity_s_to_rounding_below_and_above_the_feature_dimension(n):
    """The symmetric N × N (or D × D) route gives torch-fidelity's own number with fewer samples
    than feature dimensions (a search's rungs) and more; torch-fidelity's general eigensolver adds
    the square roots of its rounding noise on Σ₁Σ₂'s zero eigenvalues (about 1e-7 of FID here)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    d = 256
    mix = rng.normal(size=(64, d)) / 8
    ref = ReferenceStats.from_features(torch.from_numpy(rng.normal(size=(1000, 64)) @ mix + 0.1), "test")
    gen = torch.from_numpy(rng.normal(0.2, 1.3, size=(n, 64)) @ mix + rng.normal(size=(n, d)) * 0.05)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(gen), {"mu": ref.mu, "sigma": ref.sigma},
                                      verbose=False)["frechet_inception_distance"]
    assert fid_from_features(gen, ref) == pytest.approx(theirs, rel=1e-6)


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
    assert ref.kid_features.shape == (2000, 1280)  # the first 2,000 test images, for KID


def test_reference_round_trip_and_errors(tmp_path):
    ref = ReferenceStats(np.arange(3.0), np.eye(3), "x", 7)
    back = ReferenceStats.load(ref.save(tmp_path / "r.npz"))
    assert np.array_equal(back.mu, ref.mu) and back.n == 7 and back.features == "x"
    with pytest.raises(ReferenceStatsError, match="reference-stats"):
        ReferenceStats.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ReferenceStatsError, match="not a reference-statistics"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_kid_matches_an_independent_unbiased_mmd():
    from skiptune_search.scoring.metrics import kid_from_features

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8))
    y = rng.normal(0.5, 1.0, size=(50, 8))
    ref = ReferenceStats.from_features(torch.from_numpy(y), "t")

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    def mmd2(a, b):
        kaa, kbb = k(a, a), k(b, b)
        m, n = len(a), len(b)
        return ((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                - 2 * k(a, b).mean())

    # one subset of all 50 samples of each side: no randomness left but which 50 of x
    ours = kid_from_features(torch.from_numpy(x[:50]), ref, subsets=1, subset_size=50)
    assert ours == pytest.approx(mmd2(x[:50].astype(np.float32), y.astype(np.float32)), rel=1e-4)
    # the same value as torch-fidelity's own KID, subset for subset
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    theirs = kid_features_to_metric(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32)),
                                    kid_subsets=7, kid_subset_size=30, rng_seed=5, verbose=False)
    assert kid_from_features(torch.from_numpy(x), ref, subsets=7, subset_size=30, seed=5) == pytest.approx(
        theirs[KEY_METRIC_KID_MEAN], rel=1e-5)
    fresh = rng.normal(0.5, 1.0, size=(50, 8))  # new samples of the reference's distribution
    assert abs(kid_from_features(torch.from_numpy(fresh), ref, subsets=1, subset_size=50)) < ours / 5


def test_reference_from_an_image_folder_is_cached(tmp_path, monkeypatch):
    from PIL import Image

    import skiptune_search.scoring.metrics as M

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    images = M.load_images(str(folder))
    assert images.shape == (6, 3, 20, 20) and images.dtype == torch.uint8
    ext = load_extractor()
    first = M.reference_from_images(images, ext, "efficientnet-lite0", tmp_path / "cache", progress=False)
    assert first.kid_features.shape == (6, 1280) and len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setattr(M, "extract_features", lambda *a, **k: pytest.fail("cache not used"))
    again = M.reference_from_images(images, ext, "efficientnet-lite0", tmp_path / "cache")
    assert np.allclose(again.mu, first.mu, atol=1e-5) and again.kid_features.shape == (6, 1280)
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(folder / "odd.png")
    with pytest.raises(ReferenceStatsError, match="differ in size"):
        M.load_images(str(folder))
    with pytest.raises(ReferenceStatsError, match="neither"):
        M.load_images(str(tmp_path / "nowhere"))
