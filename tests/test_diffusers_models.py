"""Unconditional diffusers DDPM/DDIM pipelines, loaded offline: their UNet as a denoiser in
σ-space for the EDM samplers, or the pipeline sampled by its own __call__ with a scheduler."""

import math

import pytest
import torch

from skiptune_search.models.denoisers import DiffusersVPPrecond
from skiptune_search.models.loaders import ModelLoadError
from skiptune_search.models.source import load_denoiser


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


def test_search_on_a_diffusers_pipeline(ddpm_dir, tmp_path, monkeypatch, bundled_npz):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--model", str(ddpm_dir), "--nfe", "3", "--n", "6", "--trials", "2",
                                       "--batch", "6", "--family", "per_noise", "--knots", "2", "--reference",
                                       bundled_npz])
    assert result.exit_code == 0, result.output
    assert "ddpm-tiny-heun-nfe3-per_noise-input" in result.output


def test_cached_repo_with_the_flat_layout_of_google_ddpm(monkeypatch, tmp_path, tiny_unet):
    """google/ddpm-* repos keep the UNet and scheduler files at the top, with no unet/ or scheduler/."""
    import json

    import huggingface_hub.constants
    from diffusers import DDPMScheduler

    repo = tmp_path / "hub" / "models--someone--tiny-ddpm"
    snapshot = repo / "snapshots" / "0123abcd"
    tiny_unet.save_pretrained(snapshot)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(snapshot)
    (snapshot / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    denoiser, info = load_denoiser("someone/tiny-ddpm")
    assert isinstance(denoiser, DiffusersVPPrecond) and info["precond"] == "vp-epsilon" and info["resolution"] == 16
    assert info["name"] == "someone/tiny-ddpm"
    # and sampled by its own __call__
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    evaluator = Evaluator(Task(model="someone/tiny-ddpm", sampler="ddim", nfe=2, n=2), batch_size=2)
    assert evaluator.images(evaluator.controller.identity(), progress=False).shape == (2, 1, 16, 16)


def test_uncached_repo_id_is_a_clear_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hf download google/ddpm-cifar10-32"):
        load_denoiser("google/ddpm-cifar10-32")


@torch.no_grad()
def test_the_pipelines_own_ddim_with_a_per_noise_schedule(ddpm_dir):
    """DDPMPipeline's own loop with diffusers' DDIM at 5 steps: 5 UNet calls, each with the ρ of its
    own timestep's σ, and the images the pipeline gives under apply() for the same generators."""
    from diffusers import DDIMScheduler, DDPMPipeline

    from skiptune_search import apply
    from skiptune_search.core.schedule import RhoSchedule
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    evaluator = Evaluator(Task(model=str(ddpm_dir), sampler="ddim", nfe=5, n=2), batch_size=2)
    ctl, run = evaluator.controller, evaluator.pipeline
    assert isinstance(run.pipe, DDPMPipeline) and isinstance(run.pipe.scheduler, DDIMScheduler)
    params = {"rho_inner_k0": 0.6, "rho_outer_k0": 0.9, "rho_inner_k1": 1.3, "rho_outer_k1": 1.1}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 50.0])
    calls = []
    unet = run.pipe.unet
    handle = unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a: calls.append((float(ctl._sigma[0]), float(ctl._rho(len(ctl.skips) - 1).flatten()[0]))))
    images = evaluator.images(schedule, progress=False)
    handle.remove()
    assert images.shape == (2, 1, 16, 16) and len(calls) == 5
    for (sigma, rho), planned in zip(calls, evaluator.sigmas):
        assert rho == pytest.approx(schedule.rhos_at(sigma)[-1], rel=1e-6)
        assert sigma == pytest.approx(float(planned), rel=1e-9)
    assert calls[0][0] > calls[-1][0]  # from high noise to low
    ctl.detach()
    with apply(unet, schedule, timestep_to_sigma=run.timestep_to_sigma):
        out = run.pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                       num_inference_steps=5, output_type="np").images
    assert torch.equal(images, torch.from_numpy((out * 255).round().astype("uint8")).permute(0, 3, 1, 2))


@pytest.mark.parametrize("sampler, says", [
    ("unipc", "passes generator= to the scheduler's step, which UniPCMultistepScheduler does not take"),
    ("euler_discrete", "neither scales the initial noise nor the UNet's input, as EulerDiscreteScheduler needs"),
])
def test_schedulers_the_ddpm_pipelines_own_loop_cannot_drive(ddpm_dir, sampler, says):
    from skiptune_search.core.errors import InputError
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    with pytest.raises(InputError, match=says) as info:
        Evaluator(Task(model=str(ddpm_dir), sampler=sampler, nfe=3, n=2))
    assert info.value.option == "sampler" and "σ-space sampler (heun, euler, dpmpp_2m)" in str(info.value)


@torch.no_grad()
def test_a_ddim_pipeline_steps_only_ddim(tmp_path, tiny_unet):
    from diffusers import DDIMPipeline, DDIMScheduler

    from skiptune_search.core.errors import InputError
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddim")
    evaluator = Evaluator(Task(model=str(tmp_path / "ddim"), sampler="ddim", nfe=4, n=2), batch_size=2)
    sizes = []
    handle = evaluator.pipeline.pipe.unet.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    assert evaluator.images(evaluator.controller.identity(), progress=False).shape == (2, 1, 16, 16)
    handle.remove()
    assert sizes == [2] * 4
    with pytest.raises(InputError, match="DDIMPipeline, whose own loop steps only DDIMScheduler"):
        Evaluator(Task(model=str(tmp_path / "ddim"), sampler="dpmsolver", nfe=4, n=2))


def test_native_sampler_needs_a_diffusers_model(tmp_path):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    result = CliRunner().invoke(main, ["sample", "--sampler", "ddim", "--nfe", "3", "-n", "2", "-o",
                                       str(tmp_path / "g.png")])
    assert result.exit_code == 2 and "needs a diffusers pipeline model" in result.output


@pytest.mark.parametrize("sampler, nfe", [("heun", 9), ("dpmpp_2m", 4), ("euler", 1)])
def test_the_models_own_sigma_grid(ddpm_dir, sampler, nfe):
    """--sigma-grid model: σ of training timesteps, descending from σ_max to σ_min, then 0."""
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    evaluator = Evaluator(Task(model=str(ddpm_dir), sampler=sampler, nfe=nfe, n=2, sigma_grid="model"), batch_size=2)
    table, sigmas = evaluator.denoiser.sigma_table, evaluator.sigmas
    assert len(sigmas) == evaluator.steps + 1 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert all(torch.isclose(table, s, rtol=1e-12).any() for s in sigmas[:-1])
    assert float(sigmas[0]) == pytest.approx(float(table[-1]))
    if evaluator.steps > 1:
        assert float(sigmas[-2]) == pytest.approx(float(table[0]))
    images = evaluator.images(evaluator.controller.identity(), progress=False)
    assert images.shape == (2, 1, 16, 16)


def test_model_grid_of_a_continuous_model_is_a_one_line_error(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    result = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--sigma-grid", "model", "--nfe", "3",
                                       "-n", "2", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--sigma-grid: " in result.output and "continuous in σ" in result.output and "use the karras grid" in result.output


def test_sigma_grid_is_part_of_the_study_and_the_schedule(ddpm_dir, tmp_path, monkeypatch, bundled_npz):
    import json

    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["search", "--model", str(ddpm_dir), "--nfe", "3", "--n", "4", "--rungs", "4", "--trials", "1",
            "--reference", bundled_npz]
    result = CliRunner().invoke(main, [*args, "--sigma-grid", "model"])
    assert result.exit_code == 0, result.output
    best = json.loads((tmp_path / "studies" / "ddpm-tiny-heun-modelgrid-nfe3-linear-input.best.json").read_text())
    assert best["tuned_for"]["sigma_grid"] == "model"
    clash = CliRunner().invoke(main, [*args, "--sigma-grid", "karras", "--study",
                                      "ddpm-tiny-heun-modelgrid-nfe3-linear-input"])
    assert clash.exit_code == 2 and "sigma_grid: model (now karras)" in clash.output
