"""Model card of a trained model folder: config, training record, a sample grid and its FID."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.errors import InputError, OutputPathError
from ..core.files import check_output_path, write_text_atomic
from ..models.loaders import count_parameters
from ..sampling.images import save_grid
from ..scoring.evaluator import Evaluator
from ..scoring.metrics import ReferenceStats, extract_features, fid_from_features
from ..scoring.task import Task
from . import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, FASHION_MNIST
from .data import load_fashion_mnist


def write_model_card(model: str = DEFAULT_MODEL_NAME, nfe: int = 35, n: int = 2000, seed: int = 1_000_000,
                     data_dir: str | None = None) -> Path:
    """Sample ``n`` images at a high NFE, measure their proxy FID and the real-data floor at the
    same N, and write ``MODEL_CARD.md`` and ``samples.png`` into the model folder."""
    folder = DEFAULT_MODEL_DIR if model == DEFAULT_MODEL_NAME else Path(model)
    for name in ("samples.png", "MODEL_CARD.md"):  # before any sampling: no link, folder or FIFO planted there
        try:
            check_output_path(folder / name)
        except OutputPathError as exc:
            raise OutputPathError(f"{str(exc).split(';')[0]}, where the model card is written: remove it",
                                  option="model") from None
    task = Task(model=model, sampler="heun", nfe=nfe, n=n, seed=seed)
    evaluator = Evaluator(task)
    if evaluator.model_info.get("dataset") != FASHION_MNIST:  # its samples are compared with Fashion-MNIST's
        raise InputError(f"{model} is no Fashion-MNIST model (its record says {evaluator.model_info.get('dataset')!r}): "
                         f"a model card measures a model against Fashion-MNIST; describe it yourself", option="model")
    real, _ = load_fashion_mnist("train", data_dir)  # missing data found before the sampling, not after
    start = time.perf_counter()
    fid, images = evaluator.fid(evaluator.controller.identity(), progress="model card samples", keep=100)
    seconds = time.perf_counter() - start
    real = torch.from_numpy(real[:n].copy()).unsqueeze(1)
    floor = fid_from_features(extract_features(real, evaluator.extractor), evaluator.reference)
    save_grid(images[:100], folder / "samples.png", nrow=10)

    info = evaluator.model_info
    t = info["training"]
    cfg = t["config"]
    unet = evaluator.denoiser.net
    arch = {k: unet.config[k] for k in ("sample_size", "block_out_channels", "layers_per_block",
                                         "down_block_types", "up_block_types", "norm_num_groups")}
    ref: ReferenceStats = evaluator.reference
    text = f"""# {info['name']}: Fashion-MNIST UNet2DModel, EDM formulation

*Written by `skiptune-search model-card` on this machine; every number below was measured by it.*

- **Network**: diffusers `UNet2DModel`, {count_parameters(unet):,} parameters, {arch}.
- **Denoiser**: EDM preconditioning (σ_data = {info['sigma_data']}, c_noise = ln(σ)/4), σ ∈ [{info['sigma_min']}, {info['sigma_max']}].
- **Training**: {t['steps']:,} steps at batch {cfg['batch']} ({t['images_seen']:,} images,
  {t['images_seen'] / 60000:.1f} epochs of the 60k train split), Adam lr {cfg['lr']} with {cfg['warmup_steps']}-step warm-up,
  log-normal σ (P_mean {cfg['p_mean']}, P_std {cfg['p_std']}), EMA half-life min({cfg['ema_halflife_kimg']}k, {cfg['ema_rampup']}·images seen),
  {t['wall_seconds'] / 3600:.2f} h on {t['threads']} CPU threads. Final loss (mean of the last 200 steps): {t['final_loss']:.4f}.
- **Samples** (`samples.png`, first 100 of seeds {seed}-{seed + n - 1}): Heun, NFE {nfe}, Karras grid.
- **Proxy FID** (EfficientNet-Lite0 features at 64 px vs the {ref.n:,}-image test set): **{fid:.2f}** at N = {n:,};
  the real-data floor (first {n:,} train images vs the same statistics) is {floor:.2f}, so the model is at
  {fid / floor:.2f}x the floor. Sampling and scoring took {seconds:.0f} s.

Retrain or continue training: `skiptune-search train-default --steps N` (resumes from
`studies/train-state.pt` when present, else from these weights), then `skiptune-search model-card`.
"""
    return write_text_atomic(folder / "MODEL_CARD.md", text)
