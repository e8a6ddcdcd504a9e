"""Diffusers DDPM-family pipelines as denoisers in σ-space, loaded offline."""

import math

import pytest
import torch

from skiptune_search.denoisers import DiffusersVPPrecond
from skiptune_search.zoo import ModelLoadError, load_denoiser


@pytest.fixture
def ddpm_dir(tmp_path, tiny_unet):
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path / "ddpm-tiny"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@torch.no_grad()
def test_epsilon_model_as_sigma_space_denoiser(ddpm_dir, tiny_unet):
    denoiser, info = load_denoiser(str(ddpm_dir))
    assert isinstance(denoiser, DiffusersVPPrecond) and info["precond"] == "vp-epsilon"
    assert info["resolution"] == 16 and info["sigma_min"] < 0.02 < 80 < info["sigma_max"]
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    t = 400
    sigma = math.sqrt((1 - alphas[t]) / alphas[t])
    assert float(denoiser.timestep(torch.tensor([sigma]))) == pytest.approx(t, abs=1e-4)
    x = torch.randn(2, 1, 16, 16)
    eps = tiny_unet((x / math.sqrt(1 + sigma**2)).float(), torch.tensor([float(t)] * 2)).sample
    assert torch.allclose(denoiser(x, sigma), x - sigma * eps, atol=1e-5)


def test_search_on_a_diffusers_pipeline(ddpm_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--model", str(ddpm_dir), "--nfe", "3", "--n", "6", "--trials", "2",
                                       "--batch", "6", "--family", "per_noise", "--knots", "2"])
    assert result.exit_code == 0, result.output
    assert "ddpm-tiny-heun-nfe3-per_noise-input" in result.output


def test_uncached_repo_id_is_a_clear_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download google/ddpm-cifar10-32"):
        load_denoiser("google/ddpm-cifar10-32")
