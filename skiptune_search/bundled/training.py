"""Train the bundled default model: a diffusers UNet2DModel on Fashion-MNIST with EDM's loss.

EDM formulation (Karras et al. 2022): σ-space preconditioning, log-normal training σ,
loss weight λ(σ) = (σ² + σ_d²)/(σ σ_d)², Adam with warm-up, and an EMA of the weights whose
half-life grows with the images seen. The EMA weights are what ships.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import InputFileError
from ..core.files import atomic_path, open_input
from ..core.limits import MAX_BATCH, MAX_SEED, check_float, check_int
from ..models.denoisers import EDMPrecond, edm_training_sigmas
from ..models.loaders import load_model_info, save_model_dir
from . import FASHION_MNIST, MODEL_INFO_FILE
from .data import load_fashion_mnist

# Architecture of the bundled model: 28x28x1, three levels (28, 14, 7), attention at 7x7.
DEFAULT_UNET_CONFIG = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)


def build_default_unet():
    """A freshly initialised UNet2DModel with the bundled architecture."""
    from diffusers import UNet2DModel

    return UNet2DModel(**DEFAULT_UNET_CONFIG)


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored in the model card."""

    steps: int = 6000
    batch: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_halflife_kimg: float = 500.0
    ema_rampup: float = 0.1
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    seed: int = 0
    save_every: int = 250
    threads: int = 0  # 0: torch's default
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Each number of its type, finite and in range (as train-default's options check them)."""
        for name, low, high in (("steps", 0, 10_000_000), ("batch", 1, MAX_BATCH), ("warmup_steps", 0, 10_000_000),
                                ("seed", 0, MAX_SEED), ("save_every", 1, 10_000_000), ("threads", 0, 4096)):
            check_int(getattr(self, name), name, low, high)
        check_float(self.lr, "lr", 0, 1, low_open=True)
        for name in ("ema_halflife_kimg", "sigma_data", "p_std"):
            check_float(getattr(self, name), name, 0, low_open=True)
        check_float(self.ema_rampup, "ema_rampup", 0)  # 0: no ramp-up
        check_float(self.p_mean, "p_mean")


def _images_as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]."""
    return torch.from_numpy(images.copy()).float().div(127.5).sub(1.0).unsqueeze(1)


def _ema_beta(nimg: int, batch: int, cfg: TrainConfig) -> float:
    """Per-step EMA decay for a half-life of min(H, rampup · images seen) images (EDM)."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup > 0:
        halflife = min(halflife, nimg * cfg.ema_rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def train_default(
    out_dir: Path,
    state_path: Path,
    cfg: TrainConfig,
    data_dir: str | None = None,
    resume: bool = True,
) -> dict:
    """Train (or resume) and write the EMA weights + model card data to ``out_dir``.

    ``state_path`` keeps the raw weights, EMA and optimizer for an exact resume on this
    machine (not committed); without it, a resume starts from the EMA weights in ``out_dir``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, _ = load_fashion_mnist("train", data_dir)
    data = _images_as_tensor(images)

    net = build_default_unet()
    ema = build_default_unet()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    step, nimg, wall = 0, 0, 0.0
    history: list[list[float]] = []
    gen = torch.Generator()
    gen_state = None  # the batch/σ/noise stream where it stopped: a resume draws what a straight run would
    if resume and state_path.exists():
        with open_input(state_path, "training state", max_bytes=None, option="state") as f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
                net.load_state_dict(state["net"])
                ema.load_state_dict(state["ema"])
                opt.load_state_dict(state["opt"])
                step, nimg, wall = int(state["step"]), int(state["nimg"]), float(state["wall"])
                history = state["history"].tolist()
                gen_state = state.get("gen")
            except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError, AttributeError,
                    ValueError) as exc:
                raise InputFileError(f"training state {state_path} is not a state this command wrote "
                                     f"({type(exc).__name__}); pass another path, or start afresh instead of resuming",
                                     option="state") from None
    elif resume and (out_dir / MODEL_INFO_FILE).is_file():
        from ..models.loaders import load_unet

        info = load_model_info(out_dir)

        ema.load_state_dict(load_unet(out_dir).state_dict())
        net.load_state_dict(ema.state_dict())
        t = info.get("training", {})
        step, nimg, wall = t.get("steps", 0), t.get("images_seen", 0), t.get("wall_seconds", 0.0)
        history = t.get("loss_history", [])
    else:
        ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    precond = EDMPrecond(net, sigma_data=cfg.sigma_data)

    if gen_state is not None:
        gen.set_state(gen_state)
    else:  # a fresh run, or a resume from the model folder alone (not exact: a new stream)
        gen.manual_seed(cfg.seed * 1_000_003 + step)
    losses: list[float] = []
    start_step = step
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="train", unit="step")
    t_last = time.perf_counter()

    def checkpoint() -> dict:
        nonlocal t_last
        info = {
            "steps": step,
            "images_seen": nimg,
            "wall_seconds": round(wall, 1),
            "final_loss": float(np.mean(losses[-200:])) if losses else (history[-1][1] if history else None),
            "loss_history": history,
            "config": cfg.__dict__,
            "threads": torch.get_num_threads(),
        }
        save_model_dir(ema, out_dir, training=info, sigma_data=cfg.sigma_data, dataset=FASHION_MNIST)
        with atomic_path(state_path, suffix=".pt") as tmp:  # a fresh temp name: no link planted beside it is followed
            torch.save(
                {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "step": step, "nimg": nimg, "wall": wall, "history": torch.tensor(history), "gen": gen.get_state()},
                tmp,
            )
        return info

    info: dict = {}
    while step < cfg.steps:
        # one EDM training step
        idx = torch.randint(len(data), (cfg.batch,), generator=gen)
        y = data[idx]
        sigma = edm_training_sigmas(cfg.batch, cfg.p_mean, cfg.p_std, generator=gen)
        noise = torch.randn(y.shape, generator=gen) * sigma.reshape(-1, 1, 1, 1)
        denoised = precond(y + noise, sigma)
        weight = precond.loss_weight(sigma).reshape(-1, 1, 1, 1)
        loss = (weight * (denoised - y) ** 2).mean()
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        opt.step()
        step += 1
        nimg += cfg.batch
        # EMA of the weights
        beta = _ema_beta(nimg, cfg.batch, cfg)
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - beta)
            for be, bn in zip(ema.buffers(), net.buffers()):
                be.copy_(bn)
        now = time.perf_counter()
        wall += now - t_last
        t_last = now
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {step}")
        if step % 50 == 0:
            history.append([step, float(np.mean(losses[-50:]))])
            bar.set_postfix(loss=f"{history[-1][1]:.4f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps:
            info = checkpoint()
    bar.close()
    if not info and step == start_step and (out_dir / MODEL_INFO_FILE).is_file():
        return load_model_info(out_dir).get("training", {})  # nothing to do: leave it as it is
    return info or checkpoint()
