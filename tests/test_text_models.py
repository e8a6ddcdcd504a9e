"""Stable-Diffusion-style text-to-image pipelines: prompts per seed, classifier-free guidance in
one batched UNet call, VAE decoding, the skip controller on the conditional UNet."""

import json

import pytest
import torch

from skiptune_search import RhoSchedule
from skiptune_search.models.denoisers import TextCFGPrecond
from skiptune_search.models.prompts import read_prompts
from skiptune_search.sampling.samplers import prompt_indices
from skiptune_search.scoring.evaluator import Evaluator
from skiptune_search.scoring.task import Task
from skiptune_search.models.loaders import ModelLoadError, load_denoiser


def _evaluator(model_dir, prompts, **task):
    task = {"sampler": "euler", "nfe": 3, "n": 2, **task}
    return Evaluator(Task(model=str(model_dir), prompts=str(prompts), **task), batch_size=4, device="cpu")


def _count_unet_calls(unet):
    """Batch size of every UNet call, in order."""
    sizes = []
    handle = unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_loads_as_a_latent_cfg_denoiser(tiny_sd_dir):
    denoiser, info = load_denoiser(str(tiny_sd_dir))
    assert isinstance(denoiser, TextCFGPrecond) and info["text"] and info["precond"] == "vp-epsilon-cfg"
    assert (info["channels"], info["resolution"], info["image_resolution"]) == (4, 8, 16)
    assert 0.02 < info["sigma_min"] < 0.05 and 10 < info["sigma_max"] < 20  # SD's scaled_linear betas


def test_prompt_file_rules(tmp_path, prompt_file):
    assert read_prompts(prompt_file) == ["a red cat", "the blue sea", "three dogs"]
    assert prompt_indices([0, 1, 2, 3, 7, 1_000_000], 3) == [0, 1, 2, 0, 1, 1]
    with pytest.raises(ValueError, match="not found; give a file with one prompt per line"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(tmp_path / "blank.txt")


def test_an_sdxl_style_pipeline_is_refused_before_loading(tiny_sd_dir, tmp_path):
    import json
    import shutil

    sdxl = tmp_path / "sdxl-like"
    shutil.copytree(tiny_sd_dir, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    index["text_encoder_2"] = index["text_encoder"]
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="SDXL-style pipeline"):
        load_denoiser(str(sdxl))


def test_prompts_are_required_exactly_for_text_models(tiny_sd_dir, tiny_model_dir, prompt_file):
    with pytest.raises(ValueError, match="text-to-image model: it needs a prompt file"):
        Evaluator(Task(model=str(tiny_sd_dir), nfe=3, n=2))
    with pytest.raises(ValueError, match="takes no text"):
        Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=2, prompts=str(prompt_file)))
    with pytest.raises(ValueError, match="guidance applies to text-to-image models"):
        Task(guidance=3.0)
    assert Task(prompts=str(prompt_file)).guidance == 7.5


@torch.no_grad()
def test_cfg_samples_are_images_fixed_per_seed(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, guidance=3.0)
    identity = evaluator.controller.identity()
    used = []
    condition = evaluator.denoiser.condition
    evaluator.denoiser.condition = lambda index: used.append(list(index)) or condition(index)
    images = evaluator.images(identity, seeds=[4, 5, 9], progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert used == [[1, 2, 0]]  # seed s uses prompt s mod 3
    # seed 5 alone, and seed 5 among other seeds, batched differently: the same prompt and image
    alone = evaluator.images(identity, seeds=[5], progress=False)
    evaluator.batch_size = 2
    mixed = evaluator.images(identity, seeds=[9, 5, 4], progress=False)
    assert used[1:] == [[2], [0, 2], [1]]
    assert (alone[0].int() - images[1].int()).abs().max() <= 1 and (mixed[1].int() - images[1].int()).abs().max() <= 1
    assert (mixed[0].int() - images[2].int()).abs().max() <= 1
    assert not torch.equal(images[0], images[1])


@torch.no_grad()
def test_guidance_is_one_batched_call_and_one_is_the_conditional_alone(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, guidance=1.0)
    denoiser, unet = evaluator.denoiser, evaluator.denoiser.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(2.5)
    cond = denoiser.condition([0, 2])
    sizes, handle = _count_unet_calls(unet)
    guided_off = denoiser(x, sigma, **cond)
    # by hand: the conditional ε alone, D = x - σ ε on the VP-scaled input
    c_in = 1 / (1 + sigma**2).sqrt()
    t = denoiser.timestep(sigma.reshape(1).expand(2)).float()
    eps = unet(x * c_in, t, encoder_hidden_states=cond["prompt_embeds"]).sample
    assert torch.equal(guided_off, x - sigma * eps)
    assert sizes[0] == 2  # one call, conditional only
    denoiser.guidance = 4.0
    guided = denoiser(x, sigma, **cond)
    assert sizes[2] == 4  # [uncond, cond] in one call
    uncond_eps = unet(x * c_in, t, encoder_hidden_states=denoiser.encode_text([""]).expand(2, -1, -1)).sample
    handle.remove()
    expected = x - sigma * (uncond_eps + 4.0 * (eps - uncond_eps))
    assert torch.allclose(guided, expected, atol=1e-5) and not torch.allclose(guided, guided_off, atol=1e-3)


@torch.no_grad()
def test_text_is_encoded_once_per_prompt_not_per_step(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, guidance=2.0, nfe=4)
    calls = []
    handle = evaluator.denoiser.text_encoder.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                                       with_kwargs=True)
    evaluator.images(evaluator.controller.identity(), seeds=[0, 1, 2, 3, 4], progress=False)
    evaluator.images(evaluator.controller.identity(), seeds=[0, 1, 2, 3, 4], progress=False)  # a second trial
    handle.remove()
    assert len(calls) == 2  # prompts 0, 1, 2 at once (batch 1: seeds 0-3), the empty prompt, then nothing new


@torch.no_grad()
def test_controller_on_the_conditional_unet(tiny_sd_dir, prompt_file):
    """ρ = 1 is bit-exact, ρ ≠ 1 changes the images, and a σ-dependent ρ follows each step's σ."""
    evaluator = _evaluator(tiny_sd_dir, prompt_file, guidance=3.0, sigma_grid="model")
    ctl = evaluator.controller
    seeds = [0, 1]
    attached = evaluator.images(ctl.identity(), seeds=seeds, progress=False)
    ctl.detach()
    plain = evaluator.images(ctl.identity(), seeds=seeds, progress=False)
    ctl.attach()
    assert torch.equal(attached, plain)
    damped = evaluator.images(RhoSchedule.linear(ctl.arch, ctl.skips, 0.5, 0.8), seeds=seeds, progress=False)
    assert not torch.equal(damped, plain)

    params = {"rho_inner_k0": 0.6, "rho_outer_k0": 0.9, "rho_inner_k1": 1.3, "rho_outer_k1": 1.1}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    seen = []
    deepest = len(ctl.skips) - 1
    handle = evaluator.denoiser.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append((ctl._sigma.clone(), ctl._rho(deepest).flatten().clone())))
    evaluator.images(schedule, seeds=seeds, progress=False)
    handle.remove()
    assert len(seen) == 3  # Euler on the model's grid: one guided call per step
    for (sigma, rho), step_sigma in zip(seen, evaluator.sigmas[:-1]):
        assert sigma.shape == (4,)  # the [uncond, cond] batch: every sample at the step's σ
        assert torch.allclose(sigma, step_sigma.expand(4), rtol=1e-6)
        expected = schedule.rhos_at(float(step_sigma))[deepest]
        assert torch.allclose(rho.double(), torch.full((4,), expected, dtype=torch.float64), rtol=1e-6)


@torch.no_grad()
def test_native_dpmsolver_with_guidance(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, sampler="dpmsolver", nfe=3, guidance=5.0)
    assert evaluator.task.sigma_grid == "model"
    sizes, handle = _count_unet_calls(evaluator.denoiser.unet)
    images = evaluator.images(evaluator.controller.identity(), seeds=[0, 1], progress=False)
    handle.remove()
    assert images.shape == (2, 3, 16, 16) and sizes == [4, 4, 4]
    # the grid the scheduler visits: SD's config ('leading' spacing, offset 1), descending, then 0
    table = evaluator.denoiser.sigma_table
    assert len(evaluator.sigmas) == 4 and evaluator.sigmas[-1] == 0
    assert all(torch.isclose(table, s.to(table.dtype)).any() for s in evaluator.sigmas[:-1])


def test_model_grid_on_a_text_model(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, sampler="heun", nfe=5, sigma_grid="model")
    table, sigmas = evaluator.denoiser.sigma_table, evaluator.sigmas
    assert len(sigmas) == evaluator.steps + 1 == 4 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert all(torch.isclose(table, s).any() for s in sigmas[:-1])
    assert float(sigmas[0]) == pytest.approx(float(table[-1])) and float(sigmas[-2]) == pytest.approx(float(table[0]))


def test_search_on_a_text_model_end_to_end(tiny_sd_dir, prompt_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["search", "--model", str(tiny_sd_dir), "--prompts", str(prompt_file), "--guidance", "3", "--trials", "2",
            "--n", "4", "--rungs", "4", "--nfe", "3", "--sampler", "euler", "--batch", "4"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    name = "tiny-sd-euler-nfe3-cfg3-linear-input"
    assert f"study {name!r}" in result.output and "(karras σ grid)" in result.output
    best = json.loads((tmp_path / "studies" / f"{name}.best.json").read_text())
    assert best["tuned_for"] == {"model": str(tiny_sd_dir), "sampler": "euler", "nfe": 3, "sigma_grid": "karras",
                                 "precision": "fp32", "prompts": str(prompt_file), "guidance": 3.0}
    # evaluate takes the σ grid, prompts and guidance from the schedule (the scoring itself is tested elsewhere)
    import skiptune_search.scoring.heldout as E

    seen = []
    monkeypatch.setattr(E, "evaluate_schedule", lambda evaluator, *a: seen.append(evaluator.task) or {"stub": 1})
    result = runner.invoke(main, ["evaluate", "--schedule", f"studies/{name}.best.json", "--n", "4", "--blocks", "2",
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert (seen[0].model, seen[0].prompts, seen[0].guidance, seen[0].sigma_grid, seen[0].sampler) == (
        str(tiny_sd_dir), str(prompt_file), 3.0, "karras", "euler")
    # report samples its grids with the study's prompts and guidance
    result = runner.invoke(main, ["report", "--study", name, "-o", "r.html", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").is_file()
    # an edited prompt file is another task: the study refuses it
    prompt_file.write_text("a green cat\n")
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "prompts_sha256" in again.output
