"""Text-to-image pipelines (Stable Diffusion 1.x/2.x, SDXL) sampled by the pipeline itself: the
images a trial scores are the pipeline's own for the same generators, prompts per seed, guidance
as its own argument in one batched UNet call, the NFE exact, the skip controller on its UNet."""

import json
import shutil

import numpy as np
import pytest
import torch

from skiptune_search import RhoSchedule, apply
from skiptune_search.core.errors import InputError
from skiptune_search.models.source import load_denoiser
from skiptune_search.models.prompts import prompt_indices, read_prompts
from skiptune_search.scoring.evaluator import Evaluator
from skiptune_search.scoring.task import Task

PROMPTS = ["a red cat", "the blue sea", "three dogs"]  # prompt_file's lines


def _evaluator(model_dir, prompts, **task):
    task = {"sampler": "dpmsolver", "nfe": 3, "n": 2, **task}
    return Evaluator(Task(model=str(model_dir), prompts=str(prompts), **task), batch_size=4, device="cpu")


def _direct(pipe, seeds, steps, guidance, **kwargs):
    """The pipeline called as its users call it, one generator per seed, as uint8 (PIL's rounding)."""
    out = pipe(prompt=[PROMPTS[s % 3] for s in seeds], generator=[torch.Generator().manual_seed(s) for s in seeds],
               num_inference_steps=steps, guidance_scale=guidance, output_type="np", **kwargs).images
    return torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


def _unet_calls(unet):
    """Batch size of every UNet call, in order, and the keyword arguments of the first."""
    sizes, first = [], []
    handle = unet.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(args[0].shape[0]) or first.append(kwargs), with_kwargs=True)
    return sizes, first, handle


def _variant(source, path, **scheduler_config):
    """A copy of a pipeline folder with other scheduler settings."""
    shutil.copytree(source, path)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **scheduler_config}))
    return path


@pytest.fixture(scope="module")
def sd_v_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD pipeline as an SD 2.x-style v-prediction model (its scheduler config says so)."""
    return _variant(tiny_sd_dir, tmp_path_factory.mktemp("sd2") / "tiny-sd-v", prediction_type="v_prediction")


def test_prompt_file_rules(tmp_path, prompt_file):
    assert read_prompts(prompt_file) == PROMPTS
    assert prompt_indices([0, 1, 2, 3, 7, 1_000_000], 3) == [0, 1, 2, 0, 1, 1]
    with pytest.raises(ValueError, match="not found; give a file with one prompt per line"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(tmp_path / "blank.txt")


def test_prompts_are_required_exactly_for_text_models(tiny_sd_dir, tiny_model_dir, prompt_file, monkeypatch):
    import diffusers

    # refused from model_index.json alone: no weights are read
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="text-to-image model: it needs a prompt file"):
        Evaluator(Task(model=str(tiny_sd_dir), sampler="dpmsolver", nfe=3, n=2))
    with pytest.raises(ValueError, match="takes no text"):
        Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=2, prompts=str(prompt_file)))
    with pytest.raises(ValueError, match="guidance applies to text-to-image models"):
        Task(guidance=3.0)
    with pytest.raises(ValueError, match="guidance 0.5 must be at least 1"):  # diffusers would not guide below 1
        Task(prompts=str(prompt_file), guidance=0.5)
    assert Task(prompts=str(prompt_file)).guidance == 7.5


def test_sigma_space_samplers_are_for_unconditional_models(tiny_sd_dir, prompt_file):
    """A text pipeline is sampled by its own __call__: heun on it names the schedulers instead."""
    with pytest.raises(InputError, match="sampled by its own __call__: choose a diffusers scheduler") as info:
        load_denoiser(str(tiny_sd_dir))
    assert info.value.option == "sampler" and "dpmsolver" in str(info.value)
    with pytest.raises(InputError, match="choose a diffusers scheduler"):
        _evaluator(tiny_sd_dir, prompt_file, sampler="heun")


@torch.no_grad()
@pytest.mark.parametrize("model", ["tiny_sd_dir", "sd_v_dir"], ids=["sd1-epsilon", "sd2-v"])
def test_a_trial_scores_the_pipelines_own_images(model, request, prompt_file):
    """ρ = 1 is bit-exact with the untouched pipeline called directly with the same generators,
    prompts and guidance; a schedule gives what the pipeline gives under apply(); seed s uses
    prompt s mod 3; a seed's image does not depend on its batch."""
    model_dir = request.getfixturevalue(model)
    evaluator = _evaluator(model_dir, prompt_file, guidance=3.0)
    pipe, ctl = evaluator.pipeline.pipe, evaluator.controller
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if model == "sd_v_dir" else "epsilon")
    seeds = [4, 5, 9]
    assert evaluator.pipeline.arguments(seeds)["prompt"] == ["the blue sea", "three dogs", "a red cat"]
    images = evaluator.images(ctl.identity(), seeds=seeds, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    ctl.detach()
    assert torch.equal(images, _direct(pipe, seeds, evaluator.steps, 3.0))
    ctl.attach()
    damped = RhoSchedule.linear(ctl.arch, ctl.skips, 0.5, 0.8)
    tuned = evaluator.images(damped, seeds=seeds, progress=False)
    ctl.detach()
    with apply(pipe.unet, damped):
        assert torch.equal(tuned, _direct(pipe, seeds, evaluator.steps, 3.0))
    ctl.attach()
    assert not torch.equal(tuned, images)
    # seed 5 alone, and seeds batched otherwise: the same prompt and image
    alone = evaluator.images(ctl.identity(), seeds=[5], progress=False)
    evaluator.batch_size = 2
    mixed = evaluator.images(ctl.identity(), seeds=[9, 5, 4], progress=False)
    assert (alone[0].int() - images[1].int()).abs().max() <= 1 and (mixed[1].int() - images[1].int()).abs().max() <= 1
    assert (mixed[0].int() - images[2].int()).abs().max() <= 1
    assert not torch.equal(images[0], images[1])


@torch.no_grad()
@pytest.mark.parametrize("sampler, nfe, steps", [("dpmsolver", 3, 3), ("pndm", 4, 3), ("heun_discrete", 5, 3),
                                                 ("DDIMScheduler", 2, 2)])
def test_the_nfe_is_exact_and_guidance_doubles_the_batch_not_the_calls(tiny_sd_dir, prompt_file, sampler, nfe, steps):
    """A trial calls the UNet exactly NFE times per batch: guidance is one call on [uncond, cond],
    guidance 1 one call on the conditional half alone; PNDM spends one call more than its steps,
    Heun two per step but the last."""
    evaluator = _evaluator(tiny_sd_dir, prompt_file, sampler=sampler, nfe=nfe, guidance=4.0)
    assert evaluator.steps == steps and evaluator.task.sampler == sampler.replace("DDIMScheduler", "ddim")
    # the σ of each call, then 0: on SD's training timesteps (its 'leading' spacing), on its scaled_linear σ table
    alphas = evaluator.pipeline.pipe.scheduler.alphas_cumprod.double()
    table = ((1 - alphas) / alphas).sqrt()
    assert 0.02 < table[0] < 0.05 and 10 < table[-1] < 20
    assert len(evaluator.sigmas) == nfe + 1 and evaluator.sigmas[-1] == 0
    assert all(torch.isclose(table, s, rtol=1e-9).any() for s in evaluator.sigmas[:-1])
    sizes, _, handle = _unet_calls(evaluator.pipeline.pipe.unet)
    evaluator.images(evaluator.controller.identity(), seeds=[0, 1], progress=False)
    assert sizes == [4] * nfe
    evaluator.pipeline.guidance = 1.0
    sizes.clear()
    evaluator.images(evaluator.controller.identity(), seeds=[0, 1], progress=False)
    handle.remove()
    assert sizes == [2] * nfe


@torch.no_grad()
def test_bf16_runs_the_pipeline_under_autocast(tiny_sd_dir, prompt_file):
    evaluator = _evaluator(tiny_sd_dir, prompt_file, precision="bf16")
    seen = []
    handle = evaluator.pipeline.pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    images = evaluator.images(evaluator.controller.identity(), seeds=[0, 1], progress=False)
    handle.remove()
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16) and seen == [torch.bfloat16] * 3


def test_an_impossible_nfe_names_the_nearest(tiny_sd_dir, prompt_file):
    with pytest.raises(InputError, match="NFE 4 is impossible for heun_discrete; nearest valid: 3, 5"):
        _evaluator(tiny_sd_dir, prompt_file, sampler="heun_discrete", nfe=4)


@torch.no_grad()
def test_text_is_encoded_once_per_call_not_per_step(tiny_sd_dir, prompt_file):
    counts = []
    for nfe in (2, 4):
        evaluator = _evaluator(tiny_sd_dir, prompt_file, guidance=2.0, nfe=nfe)
        calls = []
        handle = evaluator.pipeline.pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                                                with_kwargs=True)
        evaluator.images(evaluator.controller.identity(), seeds=[0, 1, 2, 3, 4], progress=False)  # batches of 4 and 1
        handle.remove()
        counts.append(len(calls))
    assert counts == [4, 4]  # per pipeline call: the prompts, then the empty negative prompt


@pytest.fixture(scope="module")
def sd_linspace_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD pipeline with 'linspace' timestep spacing: Euler-type schedulers then pass
    fractional timesteps to the UNet."""
    return _variant(tiny_sd_dir, tmp_path_factory.mktemp("sdlin") / "tiny-sd-linspace", timestep_spacing="linspace")


@torch.no_grad()
def test_a_sigma_dependent_schedule_follows_the_schedulers_own_sigma(sd_linspace_dir, prompt_file):
    """Euler on 'linspace' spacing passes fractional timesteps: the σ the controller reads from each
    is the scheduler's own σ of that step, every sample of the [uncond, cond] batch at it; ρ is the
    schedule's there."""
    evaluator = _evaluator(sd_linspace_dir, prompt_file, sampler="euler_discrete", nfe=3, guidance=3.0)
    ctl, pipe = evaluator.controller, evaluator.pipeline.pipe
    params = {"rho_inner_k0": 0.6, "rho_outer_k0": 0.9, "rho_inner_k1": 1.3, "rho_outer_k1": 1.1}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params,
                                       sigma_knots=list(evaluator.sigma_range))
    seen, deepest = [], len(ctl.skips) - 1
    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append((ctl._sigma.clone(), ctl._rho(deepest).flatten().clone())))
    evaluator.images(schedule, seeds=[0, 1], progress=False)
    handle.remove()
    timesteps = pipe.scheduler.timesteps
    assert len(seen) == 3 and timesteps.dtype == torch.float32 and (timesteps != timesteps.round()).any()
    for (sigma, rho), own, planned in zip(seen, pipe.scheduler.sigmas, evaluator.sigmas):
        assert sigma.shape == (4,)
        assert torch.allclose(sigma, own.double().expand(4), rtol=1e-5)
        assert float(planned) == pytest.approx(float(own), rel=1e-5)
        expected = schedule.rhos_at(float(own))[deepest]
        assert torch.allclose(rho.double(), torch.full((4,), expected, dtype=torch.float64), rtol=1e-4)
    assert len({round(float(r[0]), 6) for _, r in seen}) == 3  # a different ρ at each step


@torch.no_grad()
@pytest.mark.parametrize("sampler, nfe", [("kdpm2", 5), ("lms", 4), ("heun_discrete", 5)])
def test_sigma_of_each_call_is_the_one_the_scheduler_scales_by(sd_linspace_dir, prompt_file, sampler, nfe):
    """KDPM2 calls the UNet at interpolated σ between its steps, LMS and Heun at theirs: the σ the
    controller reads from each call's timestep is the σ the scheduler scales that call's input by
    (x / sqrt(σ² + 1)), and the one the evaluator planned."""
    evaluator = _evaluator(sd_linspace_dir, prompt_file, sampler=sampler, nfe=nfe, guidance=3.0)
    scheduler, ctl = evaluator.pipeline.pipe.scheduler, evaluator.controller
    scaled, read = [], []
    scale = scheduler.scale_model_input

    def spy(sample, timestep):
        out = scale(sample, timestep)
        scaled.append(float(((sample.double() / out.double()).flatten()[0] ** 2 - 1).sqrt()))
        return out

    scheduler.scale_model_input = spy
    params = {"rho_inner_k0": 0.9, "rho_outer_k0": 0.9, "rho_inner_k1": 1.1, "rho_outer_k1": 1.1}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    handle = evaluator.pipeline.pipe.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a: read.append(float(ctl._sigma[0])))
    evaluator.images(schedule, seeds=[0, 1], progress=False)
    handle.remove()
    assert len(read) == nfe and read == pytest.approx(scaled, rel=1e-3)  # scaled: from float32 ratios
    assert read == pytest.approx(evaluator.sigmas[:-1].tolist(), rel=1e-6)


# --- SDXL ---------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("size", [None, (24, 32)], ids=["native", "24x32"])
def test_sdxl_both_encoders_micro_conditioning_and_size(tiny_sdxl_dir, prompt_file, size):
    """SDXL's own call: both text encoders, its pooled text and size micro-conditioning built
    from the image size (its native size, or --height/--width), the same images as the pipeline."""
    height, width = size or (None, None)
    evaluator = _evaluator(tiny_sdxl_dir, prompt_file, sampler="euler_discrete", nfe=3, guidance=3.0,
                           height=height, width=width)
    pipe = evaluator.pipeline.pipe
    height, width = size or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    encoders = []
    hooks = [enc.register_forward_pre_hook(lambda m, a, k, i=i: encoders.append(i), with_kwargs=True)
             for i, enc in enumerate((pipe.text_encoder, pipe.text_encoder_2))]
    sizes, first, handle = _unet_calls(pipe.unet)
    images = evaluator.images(evaluator.controller.identity(), seeds=[0, 7], progress=False)
    for h in (*hooks, handle):
        h.remove()
    assert images.shape == (2, 3, height, width) and sizes == [4] * 3
    assert encoders == [0, 1]  # each encoder once; the empty negative prompt is zeros (force_zeros_for_empty_prompt)
    added = first[0]["added_cond_kwargs"]
    assert torch.equal(added["time_ids"], torch.tensor([[height, width, 0, 0, height, width]] * 4, dtype=torch.float32))
    assert added["text_embeds"].shape == (4, 16) and first[0]["encoder_hidden_states"].shape[-1] == 32
    evaluator.controller.detach()
    direct = _direct(pipe, [0, 7], evaluator.steps, 3.0, **({"height": height, "width": width} if size else {}))
    assert torch.equal(images, direct)


def test_sdxl_size_must_fit_its_latents(tiny_sdxl_dir, prompt_file):
    with pytest.raises(InputError, match="height 25 is not a multiple of 2") as info:
        _evaluator(tiny_sdxl_dir, prompt_file, height=25)
    assert info.value.option == "height"


def test_search_on_a_text_model_end_to_end(tiny_sd_dir, prompt_file, tmp_path, monkeypatch, bundled_npz):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["search", "--model", str(tiny_sd_dir), "--prompts", str(prompt_file), "--guidance", "3", "--trials", "2",
            "--n", "4", "--rungs", "4", "--nfe", "3", "--sampler", "DPMSolverMultistepScheduler", "--batch", "4",
            "--reference", bundled_npz]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    name = "tiny-sd-dpmsolver-nfe3-cfg3-linear-input"
    assert f"study {name!r}" in result.output and "dpmsolver NFE 3 (model σ grid)" in result.output
    best = json.loads((tmp_path / "studies" / f"{name}.best.json").read_text())
    assert best["tuned_for"] == {"model": str(tiny_sd_dir), "sampler": "dpmsolver", "nfe": 3, "sigma_grid": "model",
                                 "precision": "fp32", "prompts": str(prompt_file), "guidance": 3.0}
    # evaluate takes the sampler, prompts and guidance from the schedule (the scoring itself is tested elsewhere)
    import skiptune_search.scoring.heldout as E

    seen = []
    monkeypatch.setattr(E, "evaluate_schedule", lambda evaluator, *a: seen.append(evaluator.task) or {"stub": 1})
    result = runner.invoke(main, ["evaluate", "--schedule", f"studies/{name}.best.json", "--n", "4", "--blocks", "2",
                                  "--json", "--reference", bundled_npz])
    assert result.exit_code == 0, result.output
    assert (seen[0].model, seen[0].prompts, seen[0].guidance, seen[0].sigma_grid, seen[0].sampler) == (
        str(tiny_sd_dir), str(prompt_file), 3.0, "model", "dpmsolver")
    # report samples its grids with the study's prompts and guidance
    result = runner.invoke(main, ["report", "--study", name, "-o", "r.html", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").is_file()
    # an edited prompt file is another task: the study refuses it
    prompt_file.write_text("a green cat\n")
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "prompts_sha256" in again.output


def test_an_sdxl_search_records_its_size(tiny_sdxl_dir, prompt_file, tmp_path, monkeypatch, bundled_npz):
    """The image size is part of the study (its name, its task) and of the exported schedule, and
    sample takes it from the schedule."""
    from click.testing import CliRunner
    from PIL import Image

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["search", "--model", str(tiny_sdxl_dir), "--prompts", str(prompt_file), "--sampler",
                                  "euler_discrete", "--nfe", "2", "--height", "24", "--width", "32", "--trials", "1",
                                  "--n", "4", "--rungs", "4", "--batch", "4", "--reference", bundled_npz])
    assert result.exit_code == 0, result.output
    name = "tiny-sdxl-euler_discrete-nfe2-cfg7.5-32x24-linear-input"
    best = json.loads((tmp_path / "studies" / f"{name}.best.json").read_text())
    assert (best["tuned_for"]["height"], best["tuned_for"]["width"]) == (24, 32)
    result = runner.invoke(main, ["sample", "--schedule", f"studies/{name}.best.json", "-n", "1", "-o", "g.png"])
    assert result.exit_code == 0, result.output
    assert "euler_discrete NFE 2" in result.output and Image.open(tmp_path / "g.png").size == (32, 24)
