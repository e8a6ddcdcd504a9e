"""Pipelines the tool cannot drive, and pipelines it can drive with parts missing: one line each,
said before any weights load and before anything is written to a study."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cli_helpers import one_line_error
from skiptune_search.cli import main


def text_search(model, prompts, *extra):
    return ["search", "--model", model, "--prompts", prompts, "--sampler", "dpmsolver", "--nfe", 2, "--n", 4,
            "--rungs", 4, "--batch", 4, "--trials", 1, *extra]


def cached(tmp_path, monkeypatch, folder, repo="someone/tiny"):
    """``folder`` as repo ``repo`` in a Hugging Face cache of its own (a snapshot and refs/main)."""
    import huggingface_hub.constants

    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / "0123abcd")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return root / "snapshots" / "0123abcd"


@pytest.mark.parametrize("name, backbone", [
    ("StableDiffusion3Pipeline", "SD3Transformer2DModel"), ("PixArtAlphaPipeline", "PixArtTransformer2DModel"),
    ("FluxPipeline", "FluxTransformer2DModel"),
])
def test_transformer_pipelines_have_no_long_skips(run, tmp_path, prompt_file, name, backbone):
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": name, "transformer": ["diffusers", backbone], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))  # no weights: it is refused before them
    says = f"--model: {folder} is a {name} whose denoiser is a transformer (transformer {backbone}): it has no long skips"
    one_line_error(run(*text_search(folder, prompt_file)), says)
    one_line_error(run("search", "--model", folder, "--nfe", 3), says)  # the σ-space path says the same
    one_line_error(run("inspect", "--model", folder), says)
    assert not (tmp_path / "studies").exists()


def test_a_unet_pipeline_of_another_kind_is_refused(run, tmp_path, tiny_sd_dir, prompt_file):
    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_sd_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    one_line_error(run(*text_search(folder, prompt_file)), "is a StableDiffusionInpaintPipeline, which skiptune-search "
                   "cannot sample; it drives StableDiffusionPipeline, StableDiffusionXLPipeline, DDPMPipeline, DDIMPipeline")
    assert not (tmp_path / "studies").exists()


def test_missing_text_encoder_and_vae_of_a_folder_are_named(run, tmp_path, tiny_sd_dir, prompt_file):
    folder = tmp_path / "partial-sd"
    shutil.copytree(tiny_sd_dir, folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "tokenizer")
    one_line_error(run(*text_search(folder, prompt_file)),
                   f"--model: {folder} lacks text_encoder/model.safetensors, tokenizer/*, vae/config.json, "
                   f"vae/diffusion_pytorch_model.safetensors, which its StableDiffusionPipeline needs; copy them from "
                   f"the model's repository into the folder")
    assert not (tmp_path / "studies").exists()


def test_missing_sdxl_encoder_of_a_cached_repo_names_the_download(run, tmp_path, monkeypatch, tiny_sdxl_dir,
                                                                   prompt_file):
    snapshot = cached(tmp_path, monkeypatch, tiny_sdxl_dir, "someone/tiny-sdxl")
    shutil.rmtree(snapshot / "text_encoder_2")
    one_line_error(run(*text_search("someone/tiny-sdxl", prompt_file)),
                   "someone/tiny-sdxl lacks text_encoder_2/config.json, text_encoder_2/model.safetensors, which its "
                   "StableDiffusionXLPipeline needs; on a machine with internet run: hf download someone/tiny-sdxl "
                   '--include "text_encoder_2/config.json" "text_encoder_2/model.safetensors"')
    assert not (tmp_path / "studies").exists()


def test_text_encoders_need_transformers(run, tmp_path, tiny_sd_dir, prompt_file, monkeypatch):
    import importlib.util

    import skiptune_search.models.pipelines as P

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "transformers"
                        else find_spec(name, *a))
    one_line_error(run(*text_search(tiny_sd_dir, prompt_file)),
                   "needs the package transformers (its text encoders): pip install 'skiptune-search[text]'")
    assert not (tmp_path / "studies").exists()


def test_schedulers_by_name_and_class(run, tmp_path, tiny_sd_dir, prompt_file):
    one_line_error(run(*text_search(tiny_sd_dir, prompt_file, "--sampler", "bogus")), "Invalid value for '--sampler'",
                   "'bogus' is not one of heun, euler, dpmpp_2m, ddim")
    one_line_error(run(*text_search(tiny_sd_dir, prompt_file, "--sampler", "FooScheduler")),
                   "--sampler: FooScheduler is not a diffusers scheduler that", "PNDMScheduler config fits")
    one_line_error(run(*text_search(tiny_sd_dir, prompt_file, "--sampler", "EDMEulerScheduler")),
                   "--sampler: EDMEulerScheduler does not call the UNet at", "training timesteps")
    one_line_error(run(*text_search(tiny_sd_dir, prompt_file, "--sampler", "heun_discrete", "--nfe", 4)),
                   "--nfe: NFE 4 is impossible for heun_discrete; nearest valid: 3, 5")
    one_line_error(run("sample", "--model", tiny_sd_dir, "--prompts", prompt_file, "--sampler", "dpmsolver", "--nfe", 2,
                       "--height", 21, "-n", 2, "-o", "g.png"), "--height: height 21 is not a multiple of 2")
    assert not (tmp_path / "studies").exists() and not (tmp_path / "g.png").exists()
    # a class name with a short name is stored by its short name (a search by class name: test_text_models)
    from skiptune_search.scoring.task import Task

    assert Task(sampler="KDPM2DiscreteScheduler", prompts=str(prompt_file)).sampler == "kdpm2"
    assert Task(sampler="DPMSolverSDEScheduler", prompts=str(prompt_file)).sampler == "DPMSolverSDEScheduler"


@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_inspect_reads_a_text_pipelines_unet_alone(run, request, tmp_path, model):
    folder = tmp_path / "unet-only"
    shutil.copytree(request.getfixturevalue(model), folder)
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "vae")
    result = run("inspect", "--model", folder)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("UNet2DConditionModel: ") and "conv_in" in result.output
