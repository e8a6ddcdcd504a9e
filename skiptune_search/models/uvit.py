"""U-ViT networks (baofff/U-ViT): a state-dict checkpoint, built from the user's checkout.

The network class comes from the checkout's ``libs/uvit.py`` and its arguments from one of the
checkout's ``configs/*.py`` (``config.nnet``), so both run the checkout's code: that happens only
when the user names the checkout (``uvit_path``, command line only). The config is picked by name
(``uvit_config``; by default the checkpoint's file name, as in 'cifar10_uvit_small.pth'), only
from the checkout's ``configs/`` folder. The checkpoint is a state dict, read with
``torch.load(weights_only=True)``: it runs no code.

Supported: the pixel-space models (train.py / eval.py: CIFAR-10, CelebA 64, ImageNet 64),
noise prediction on the repo's continuous VP SDE (β from 0.1 to 20 over t in [0, 1], the network
called at t·999). As a denoiser in σ-space: σ(t) = (exp(∫β) − 1)^½, the input x / (1 + σ²)^½,
D = x − σ ε̂. The σ range is that of the config's sampler: t from 1e-4 (dpm_solver) or 1e-3
(Euler-Maruyama) to 1. Latent (``z_shape``) and text-to-image configs say so in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.files import check_input_file

BETA_MIN, BETA_MAX = 0.1, 20.0  # sde.VPSDE's defaults, which eval.py uses
T_SCALE = 999  # sde.ScoreModel calls the network at t * 999
PIP_NAMES = {"ml_collections": "ml-collections", "absl": "absl-py"}


class UViTPrecond(nn.Module):
    """A noise-predicting U-ViT on the VP SDE as D(x, σ, labels) in EDM's σ-space."""

    def __init__(self, net: nn.Module, label_dim: int = 0, t_min: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.label_dim = int(label_dim)
        self.sigma_min = float(self.sigma_of_t(torch.tensor(t_min, dtype=torch.float64)))
        self.sigma_max = float(self.sigma_of_t(torch.tensor(1.0, dtype=torch.float64)))

    @staticmethod
    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        """σ = ((1 − ᾱ(t)) / ᾱ(t))^½ with ᾱ(t) = exp(−∫₀ᵗ β)."""
        return torch.expm1(BETA_MIN * t + (BETA_MAX - BETA_MIN) * t**2 / 2).sqrt()

    @staticmethod
    def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
        """The t of a σ: the root in [0, 1] of β_min t + (β_max − β_min) t²/2 = ln(1 + σ²)."""
        a = BETA_MAX - BETA_MIN
        return ((BETA_MIN**2 + 2 * a * torch.log1p(sigma**2)).sqrt() - BETA_MIN) / a

    def sigma_from_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a network call at ``timestep`` (= t · 999)."""
        return self.sigma_of_t(torch.as_tensor(timestep, dtype=torch.float64) / T_SCALE)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = self.t_of_sigma(sigma)
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        y = class_labels.argmax(dim=1) if self.label_dim and class_labels is not None else None
        eps = self.net(x / (1 + s**2).sqrt(), (t * T_SCALE).float(), y=y)
        return x - s * eps


def _import_file(name: str, path: Path, package_dir: Path | None = None):
    """Import ``path`` as module ``name`` (a package when ``package_dir`` is given), its prints
    kept off the console; a missing package is a one-line error naming it."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with redirect_stdout(io.StringIO()):  # libs/uvit.py prints its attention mode
            spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        del sys.modules[name]
        top = (exc.name or "?").split(".")[0]
        raise ModelLoadError(f"{path} needs the package {top!r}, which is not installed: "
                             f"pip install {PIP_NAMES.get(top, top)}") from None
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _get(config, key: str, default=None):
    """``config[key]`` of an ml_collections ConfigDict (or any mapping), else ``default``."""
    try:
        return config[key] if key in config else default
    except TypeError:
        return default


def _checkout(uvit_path) -> Path:
    if uvit_path is None:
        raise ModelLoadError("a U-ViT checkpoint is built from a checkout of baofff/U-ViT (its libs/uvit.py and "
                             "configs/): give its path", option="uvit_path")
    root = Path(uvit_path)
    if not (root / "libs" / "uvit.py").is_file() or not (root / "configs").is_dir():
        raise ModelLoadError(f"{root} is not a checkout of baofff/U-ViT (no libs/uvit.py and configs/ in it)",
                             option="uvit_path")
    return root


def _config_file(root: Path, model: Path, uvit_config: str | None) -> Path:
    name = uvit_config or model.stem
    known = sorted(p.stem for p in (root / "configs").glob("*.py"))
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name not in known:
        what = f"config {name!r}" if uvit_config else f"no config named like the checkpoint ({name!r})"
        raise ModelLoadError(f"{what} in {root / 'configs'}: name the checkpoint's config, one of "
                             f"{', '.join(known) or 'none'}", option="uvit_config")
    return root / "configs" / f"{name}.py"


def load_uvit(model: str | os.PathLike, uvit_path, uvit_config: str | None = None) -> tuple[nn.Module, dict]:
    """The denoiser and info of a U-ViT checkpoint ``model`` (a state dict, e.g. cifar10_uvit_small.pth)."""
    if model is None or not str(model).endswith(".pth"):
        raise ModelLoadError(f"a U-ViT checkpoint is a state dict (.pth) to build with the checkout's code; "
                             f"got {model}", option="model")
    model = Path(model)
    root = _checkout(uvit_path)
    config_path = _config_file(root, model, uvit_config)
    if not model.is_file():
        raise ModelLoadError(f"U-ViT checkpoint {model} not found", option="model")
    # the checkout's modules under names of their own: its top-level 'libs' and 'configs' stay out of sys.modules
    tag = "skiptune_uvit_" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    config = _import_file(f"{tag}_config_{config_path.stem}", config_path).get_config()
    nnet = dict(_get(config, "nnet") or {})
    where = f"{config_path.name}"
    if nnet.get("name") != "uvit":
        raise ModelLoadError(f"{where}: its network is {nnet.get('name')!r}; only the class-conditional and "
                             f"unconditional U-ViT ('uvit') is supported, not text-to-image")
    if _get(config, "z_shape") is not None:
        raise ModelLoadError(f"{where} is a latent-space model (z_shape, decoded by the repo's autoencoder); only "
                             f"the pixel-space U-ViT models are supported")
    if _get(config, "pred", "noise_pred") != "noise_pred":
        raise ModelLoadError(f"{where} predicts {_get(config, 'pred')!r}; only noise prediction is supported")
    _import_file(f"{tag}_libs", root / "libs" / "__init__.py", package_dir=root / "libs")  # libs/uvit.py imports .timm
    uvit = _import_file(f"{tag}_libs.uvit", root / "libs" / "uvit.py")
    kwargs = {k: v for k, v in nnet.items() if k != "name"}
    kwargs["use_checkpoint"] = False  # gradient checkpointing: a training memory saver, the same outputs
    net = uvit.UViT(**kwargs)
    check_input_file(model, "U-ViT checkpoint", error=ModelLoadError, option="model")  # a FIFO would hang torch
    try:
        state = torch.load(model, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError, EOFError) as exc:  # torch's messages for a bad or foreign file
        raise ModelLoadError(f"{model} does not load into the U-ViT of {where}: "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
    train = _get(config, "train") or {}
    classes = int(nnet.get("num_classes", -1))
    label_dim = classes if _get(train, "mode") == "cond" and classes > 0 else 0
    sample = _get(config, "sample") or {}
    t_min = 1e-4 if _get(sample, "algorithm") == "dpm_solver" else 1e-3  # eval.py's eps per sampler
    denoiser = UViTPrecond(net.eval().requires_grad_(False), label_dim, t_min)
    size = int(nnet.get("img_size", 224))
    info = {"name": str(model), "precond": "uvit-vp-eps", "config": config_path.stem, "resolution": size,
            "channels": int(nnet.get("in_chans", 3)), "sigma_min": denoiser.sigma_min,
            "sigma_max": denoiser.sigma_max, "label_dim": label_dim}
    return denoiser, info
