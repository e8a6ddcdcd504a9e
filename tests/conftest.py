import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the Fashion-MNIST format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped data folder with 64 train and 32 test images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


@pytest.fixture
def tiny_unet():
    """A small random UNet2DModel with the bundled architecture's structure."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_unet) -> Path:
    """A model folder as train-default writes it after 0 steps: the tiny random UNet, its record
    saying Fashion-MNIST (the data train-default trains on), so the bundled reference scores it."""
    from skiptune_search.models.loaders import FASHION_MNIST, save_model_dir

    out = tmp_path / "tiny-model"
    save_model_dir(tiny_unet, out, training={"steps": 0}, dataset=FASHION_MNIST)
    return out


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 8):
    """A CLIP tokenizer over single letters (enough to tell prompts apart), from files in ``folder``."""
    import json

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A Stable-Diffusion-style pipeline folder with tiny random parts: a CLIP text encoder (16-d),
    a UNet2DConditionModel on 4x8x8 latents with cross-attention, an AutoencoderKL (8x8 -> 16x16
    RGB) and SD 1.5's scheduler config (PNDM, scaled_linear betas)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    tokenizer = write_tiny_clip_tokenizer(root / "tokenizer-files")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "tiny-sd")
    return root / "tiny-sd"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """An SDXL-style pipeline folder with tiny random parts: two CLIP text encoders (16-d hidden
    states each, concatenated to the UNet's 32-d cross-attention; the second with a 16-d pooled
    projection), a UNet2DConditionModel with SDXL's 'text_time' added embeddings (the pooled text
    and the six size and crop numbers), an AutoencoderKL (8x8 latents -> 16x16 RGB) and SDXL base's
    scheduler config (Euler, scaled_linear betas, 'leading' spacing)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = write_tiny_clip_tokenizer(root / "tokenizer-files")
    torch.manual_seed(0)
    config = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=16)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(root / "tiny-sdxl")
    return root / "tiny-sdxl"


@pytest.fixture
def bundled_npz() -> str:
    """The bundled Fashion-MNIST statistics as an explicit reference file: what a test of a model
    that is no Fashion-MNIST model (a pipeline, a pickle, a network of its own) scores against."""
    from skiptune_search.scoring.metrics import DEFAULT_REFERENCE

    return str(DEFAULT_REFERENCE)


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    """Three prompts, with blank lines around them (ignored)."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\nthe blue sea\n   \nthree dogs\n")
    return path


@pytest.fixture
def run(tmp_path, monkeypatch):
    """The command line in-process, in an empty working folder, offline: run("search", "--nfe", 3)."""
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
