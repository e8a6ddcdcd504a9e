"""Model loaders: a model folder or an EDM/EDM2 pickle to a denoiser D(x, σ) and its facts
(``source`` picks the loader of a model source: these, a pipeline's, a U-ViT's).

The bundled default model is a small diffusers UNet2DModel trained on Fashion-MNIST (EDM loss).

A model directory is diffusers' own layout (``config.json`` + ``diffusion_pytorch_model.safetensors``)
plus ``skiptune_model.json``: how the raw network is preconditioned and how it was trained.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..bundled import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, FASHION_MNIST, MODEL_INFO_FILE
from ..core.errors import ModelLoadError
from ..core.files import check_input_file, read_json
from .denoisers import EDMPrecond
from .edm2 import is_edm2_precond, load_edm2



def load_unet(model_dir: Path):
    """Load a diffusers UNet2DModel from a local folder (safetensors only, no network)."""
    from diffusers import UNet2DModel

    model_dir = Path(model_dir)
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    if not (model_dir / "config.json").is_file() or not weights.is_file():
        raise ModelLoadError(
            f"{model_dir} is not a diffusers model folder (needs config.json and "
            f"diffusion_pytorch_model.safetensors); train one with 'skiptune-search train-default'", option="model"
        )
    try:
        return UNet2DModel.from_pretrained(
            model_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises many types for a damaged folder
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {model_dir}: {first}; write the folder again with train-default",
                             option="model") from exc


MODEL_INFO_KEYS = {"precond": str, "sigma_data": (int, float), "sigma_min": (int, float),
                   "sigma_max": (int, float), "resolution": int, "channels": int}


def load_model_info(model_dir: Path) -> dict:
    """The folder's ``skiptune_model.json``, checked: every key the loader reads, of its type."""
    path = Path(model_dir) / MODEL_INFO_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: this folder was not written by skiptune-search", option="model")
    info = read_json(path, "model record", error=ModelLoadError, option="model")
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path} holds no JSON object; write the folder again with train-default",
                             option="model")
    for key, kind in MODEL_INFO_KEYS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise ModelLoadError(f"{path}: key {key!r} is missing or not a {getattr(kind, '__name__', 'number')}; "
                                 f"write the folder again with train-default", option="model")
    if not isinstance(info.get("dataset", ""), str):  # optional: what the model was trained on
        raise ModelLoadError(f"{path}: key 'dataset' is not a string (the name of the training data, e.g. "
                             f"{FASHION_MNIST!r}); fix it or write the folder again with train-default", option="model")
    bounds = {"sigma_data": info["sigma_data"] > 0, "sigma_min": info["sigma_min"] > 0,
              "sigma_max": info["sigma_max"] > info["sigma_min"], "resolution": 1 <= info["resolution"] <= 1 << 16,
              "channels": 1 <= info["channels"] <= 1 << 16}
    for key, ok in bounds.items():
        if not ok:
            need = {"sigma_max": "above sigma_min", "resolution": "a size in pixels",
                    "channels": "a channel count"}.get(key, "positive")
            raise ModelLoadError(f"{path}: {key} = {info[key]!r} must be {need}; write the folder again with "
                                 f"train-default", option="model")
    return info


def check_model_config(model_dir: Path, info: dict) -> None:
    """The folder's diffusers ``config.json`` read bounded, and it describes the network its record
    does (resolution, channels): a config edited apart from its record is refused."""
    path = Path(model_dir) / "config.json"
    config = read_json(path, "model config", error=ModelLoadError, option="model")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds no JSON object; write the folder again with train-default", option="model")
    size = config.get("sample_size")
    size = size[0] if isinstance(size, list) and size else size
    for key, found, want in (("sample_size", size, info["resolution"]),
                             ("in_channels", config.get("in_channels"), info["channels"])):
        if found != want:
            raise ModelLoadError(f"{path}: {key} {found!r} does not match the model record's {want!r}; write the "
                                 f"folder again with train-default", option="model")


def load_model_folder(model_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The denoiser D(x, σ) and info of a model folder written by train-default (the bundled
    model's too): its record checked, its diffusers UNet in EDM's preconditioning."""
    model_dir = Path(model_dir)
    info = load_model_info(model_dir)
    if info.get("precond") != "edm":
        raise ModelLoadError(f"{model_dir / MODEL_INFO_FILE}: precond {info.get('precond')!r} is not 'edm', the only "
                             f"preconditioning of these folders; write the folder again with train-default",
                             option="model")
    check_model_config(model_dir, info)
    unet = load_unet(model_dir).eval().requires_grad_(False)
    denoiser = EDMPrecond(
        unet,
        sigma_data=info["sigma_data"],
        sigma_min=info["sigma_min"],
        sigma_max=info["sigma_max"],
    )
    info = dict(info, name=DEFAULT_MODEL_NAME if model_dir == DEFAULT_MODEL_DIR else str(model_dir))
    return denoiser, info


def load_edm_pickle(path: Path, trust_pickle: bool, edm_path: str | os.PathLike | None) -> tuple[torch.nn.Module, dict]:
    """An EDM or EDM2 network pickle (``network-snapshot-*.pkl``, ``edm-*.pkl``, ``edm2-*.pkl``):
    its ``ema`` Precond net (EDM2's through ``edm2.load_edm2``).

    Unpickling executes code named in the file and needs the code base's own modules
    (``torch_utils``, ``training``, ``dnnlib``) importable: pass ``edm_path``, a checkout of
    NVlabs/edm, or of NVlabs/edm2 for an EDM2 pickle.
    """
    if not trust_pickle:
        raise ModelLoadError(
            f"{path} is a pickle, and loading a pickle runs code from it: allow it (trust_pickle) only if you "
            f"trust its source (e.g. NVlabs' own EDM checkpoints)", option="trust_pickle"
        )
    check_input_file(path, "EDM pickle", error=ModelLoadError, option="model")
    if edm_path is not None:
        if not Path(edm_path).is_dir():
            raise ModelLoadError(f"{edm_path} is not a folder; point it at a checkout of NVlabs/edm", option="edm_path")
        if str(edm_path) not in sys.path:
            sys.path.insert(0, str(edm_path))
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the user said --trust-pickle
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"{path} needs the module {exc.name!r} of the EDM code base: give the path of a "
            f"checkout of NVlabs/edm (of NVlabs/edm2 for an EDM2 network)", option="edm_path"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is not a readable network pickle ({exc}); download it again") from None
    net = data["ema"] if isinstance(data, dict) and "ema" in data else data
    if is_edm2_precond(net):  # NVlabs/edm2: EDM2's own σ range, and latent models decode through a VAE
        return load_edm2(path, net, data)
    missing = [a for a in ("sigma_min", "sigma_max", "img_resolution", "img_channels") if not hasattr(net, a)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise ModelLoadError(f"{path} holds no EDM Precond network (missing {', '.join(missing) or 'nn.Module'})")
    net = net.eval().requires_grad_(False)
    # a Precond records the σ range it supports (EDMPrecond: 0 to inf); sample inside EDM's
    # generate.py defaults, σ from 0.002 to 80, as EDM does
    info = {"name": str(path), "precond": type(net).__name__, "resolution": int(net.img_resolution),
            "channels": int(net.img_channels), "sigma_min": max(0.002, float(net.sigma_min)),
            "sigma_max": min(80.0, float(net.sigma_max)),
            "label_dim": int(getattr(net, "label_dim", 0) or 0)}
    return net, info


def save_model_dir(unet, out_dir: Path, training: dict, sigma_data: float = 0.5, *, dataset: str) -> None:
    """Write a model folder atomically: a temp folder beside it, then a rename. ``dataset``: what
    the network was trained on (its record's 'dataset'; the bundled reference statistics serve
    only a model trained on Fashion-MNIST)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        info = {
            "format": "skiptune-model/1",
            "precond": "edm",
            "sigma_data": sigma_data,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "dataset": dataset,
            "resolution": int(unet.config.sample_size),
            "channels": int(unet.config.in_channels),
            "training": training,
        }
        # keep files and folders written next to the weights by hand (model card, sample grids)
        if out_dir.is_dir():
            for extra in out_dir.iterdir():
                if extra.name not in {"config.json", "diffusion_pytorch_model.safetensors", MODEL_INFO_FILE}:
                    (shutil.copytree if extra.is_dir() else shutil.copy2)(extra, tmp / extra.name)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.is_symlink() or old.exists() and not old.is_dir():  # planted there: never followed
            old.unlink()
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed between the two renames below
        if out_dir.exists():
            out_dir.replace(old)
        tmp.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 256) -> str:
    """16 hex digits over each parameter's and buffer's name, shape, dtype and the bytes of up to
    ``per_tensor`` evenly strided values: retraining changes it, the device does not, and reading
    a few values per tensor keeps it quick for a billion-parameter UNet."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // per_tensor)].cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    return digest.hexdigest()[:16]
