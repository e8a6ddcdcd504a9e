"""The ComfyUI node: a schedule file's ρ and FreeU factors on a MODEL, through ComfyUI's patch API.

``patch_model(model, schedule)`` returns ``model.clone()`` with one ``output_block_patch``:
ComfyUI's UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py) calls it in each output block
with the backbone ``h`` and the skip ``hsp`` just before ``cat([h, hsp], 1)``: where the
controller's ``input`` placement acts in a diffusers UNet (the consuming resnet's input), so the
patch does what ``apply()`` does, with the factors of ``RhoSchedule.factors_at`` at each sample's
σ (``transformer_options["sigmas"]``; a guided batch holds the samples once per cond/uncond
chunk, so ``h`` may have a multiple of its rows). Output block i pops the skip the encoder saved
i-th from the end: skip ``n - 1 - i`` of the schedule's order (0 = outermost, conv_in's output).

The model's skip layout is read from its input blocks in diffusers' names, so a schedule tuned
on the diffusers form of a model (``UNet2DConditionModel``) is checked against the ComfyUI form
of the same model as ``apply()`` checks it. Nothing is imported from ComfyUI at import time but
``folder_paths`` (to register ``models/skiptune/``), and nothing from ComfyUI's model code until
a node runs.
"""

from __future__ import annotations

import os
from typing import Any

from ..core import freeu
from ..core.errors import NoSkipsError, ScheduleError
from ..core.schedule import RhoSchedule, SkipInfo, load_schedule

FOLDER = "skiptune"  # models/skiptune/, and extra_model_paths.yaml entries named so
EXTENSIONS = {".json"}
ARCH = "UNet2DConditionModel"  # the diffusers class of the UNets ComfyUI's UNetModel runs
# skip layouts by (number of skips, channels per level): the names a person knows them by
KNOWN_LAYOUTS = {(12, (320, 640, 1280, 1280)): "SD 1.x/2.x", (9, (320, 640, 1280)): "SDXL",
                 (12, (384, 768, 1536, 1536)): "SDXL refiner"}


def register_folder() -> None:
    """Make ``models/skiptune/`` ComfyUI's folder of schedule files (JSON only), beside any path
    extra_model_paths.yaml gives for ``skiptune``. Outside ComfyUI (no ``folder_paths``): nothing."""
    try:
        import folder_paths
    except ImportError:
        return
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    if default not in paths:
        paths.append(default)
    extensions.update(EXTENSIONS)


# --- the model's skips -------------------------------------------------------------------------
def model_skips(model: Any, resolution: int) -> list[SkipInfo]:
    """The long skips of a ComfyUI MODEL (a ModelPatcher) in diffusers' names and the schedule's
    order: conv_in, then per level its resnets (``attentions.j`` where a transformer follows the
    resnet) and its downsampler; ``resolution`` is the first skip's (ComfyUI's UNet does not know
    its sample size: the schedule's is taken, so only the halvings are compared). Consumers are
    ComfyUI's ``output_blocks.i``. A model without long skips (a DiT) is a NoSkipsError."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel

    if not isinstance(unet, UNetModel):
        kind = type(unet).__name__ if unet is not None else type(model).__name__
        raise NoSkipsError(f"this MODEL's diffusion model is a {kind}, not a UNet with the long skips Skip-Tuning "
                           f"tunes (SD 1.x, SD 2.x, SDXL): SD3, Flux and other DiT models are transformers without "
                           f"long skips", option="model")
    producers, level, index = [], 0, 0
    for k, block in enumerate(unet.input_blocks):
        first = block[0]
        if k == 0:
            producers.append(("conv_in", int(first.out_channels), resolution))
        elif isinstance(first, Downsample):
            resolution = (resolution + 1) // 2  # diffusers' padded stride-2 conv
            producers.append((f"down_blocks.{level}.downsamplers.0", int(first.out_channels), resolution))
            level, index = level + 1, 0
        elif isinstance(first, ResBlock):
            part = "attentions" if any(isinstance(layer, SpatialTransformer) for layer in block) else "resnets"
            producers.append((f"down_blocks.{level}.{part}.{index}", int(first.out_channels), resolution))
            index += 1
        else:
            raise NoSkipsError(f"input block {k} of this UNet is a {type(first).__name__}, not a layout Skip-Tuning "
                               f"knows (SD 1.x, SD 2.x, SDXL)", option="model")
    n = len(producers)
    if len(unet.output_blocks) != n:
        raise NoSkipsError(f"this UNet saves {n} skips but has {len(unet.output_blocks)} output blocks: not a layout "
                           f"Skip-Tuning knows (SD 1.x, SD 2.x, SDXL)", option="model")
    return [SkipInfo(name, f"output_blocks.{n - 1 - i}", channels, res)
            for i, (name, channels, res) in enumerate(producers)]


def describe(arch: str, skips: list[SkipInfo]) -> str:
    """A layout as a person knows it: 'SDXL (9 skips; 320/640/1280 channels by level)'."""
    levels: dict[int, int] = {}
    for s in skips:  # a level's channels: its last skip's (a downsampler's output has the level above's)
        levels[s.resolution] = s.channels
    channels = tuple(levels[r] for r in sorted(levels, reverse=True))
    shape = f"{len(skips)} skips; {'/'.join(map(str, channels))} channels by level"
    name = KNOWN_LAYOUTS.get((len(skips), channels)) if arch == ARCH else None
    return f"{name} ({shape})" if name else f"a {arch} with {shape}"


def check_schedule(schedule: RhoSchedule, skips: list[SkipInfo], name: str = "the schedule") -> None:
    """The checks ``apply()`` makes, in words for a ComfyUI user: the placement (only ``input``
    reaches ComfyUI's patch) and the skip layout (both named where they differ)."""
    if schedule.placement != "input":
        raise ScheduleError(f"{name} scales the skips with placement {schedule.placement!r} (after the block's first "
                            f"normalization), which ComfyUI's patch cannot reach: for ComfyUI, search with "
                            f"--placement input", option="placement")
    if schedule.freeu is not None and schedule.freeu.variant != "v1-stages":
        raise ScheduleError(f"{name}'s FreeU is the {schedule.freeu.variant} variant (Forge's and sd-webui-freeu's "
                            f"function), and this node applies diffusers' FreeU (v1-stages) only: for ComfyUI, search "
                            f"with --freeu-variant v1-stages", option="schedule")
    try:
        schedule.check_layout(ARCH, skips)
    except ScheduleError as exc:
        raise ScheduleError(f"{name} was tuned for {describe(schedule.arch, schedule.skips)}, this model is "
                            f"{describe(ARCH, skips)} ({exc}): use a schedule tuned for this model",
                            option="schedule") from None


# --- the patch ---------------------------------------------------------------------------------
class OutputBlockPatch:
    """ComfyUI's ``output_block_patch``: ``(h, hsp, transformer_options) -> (h, hsp)`` with the
    schedule's FreeU factors on ``h``'s first half of channels and on ``hsp``'s lowest
    frequencies, then ``hsp`` times ρ, at each row's σ. New tensors: the inputs are not changed."""

    def __init__(self, schedule: RhoSchedule, skips: list[SkipInfo]) -> None:
        self.schedule = schedule
        self.skips = skips
        self._static = None if schedule.depends_on_sigma else schedule.factors_at()
        self._last: tuple[Any, int, Any, list] | None = None  # (σ tensor, rows, device, factors) of this call

    def factors(self, rows: int, options: dict, device: Any) -> list:
        """Every skip's factors for a batch of ``rows``, one per row (on ``device``) where they
        depend on σ; computed once per UNet call (its σ tensor), on the CPU in float64 (which
        some devices, Apple's MPS among them, lack)."""
        if self._static is not None:
            return self._static
        sigmas = options.get("sigmas")
        if sigmas is None:
            raise ScheduleError("this schedule depends on σ, but the UNet was called without "
                                "transformer_options['sigmas'] (not from a ComfyUI sampler)", option="schedule")
        if self._last is not None and self._last[0] is sigmas and self._last[1:3] == (rows, device):
            return self._last[3]  # the same call's next block
        import dataclasses

        import torch

        per_sample = torch.as_tensor(sigmas).detach().reshape(-1).to("cpu", torch.float64)
        if rows % per_sample.numel():
            raise RuntimeError(f"{rows} rows in the UNet's batch for {per_sample.numel()} σ: not a multiple")
        # a guided batch is the samples once per cond/uncond chunk, one chunk after the other
        factors = self.schedule.factors_at(per_sample.repeat(rows // per_sample.numel()))
        moved = [dataclasses.replace(f, rho=f.rho.to(device, torch.float32) if torch.is_tensor(f.rho) else f.rho,
                                     freeu=f.freeu.to(device) if torch.is_tensor(f.freeu) else f.freeu)
                 for f in factors]
        self._last = (sigmas, rows, device, moved)
        return moved

    def __call__(self, h, hsp, transformer_options: dict):
        kind, i = transformer_options.get("block", (None, None))
        if kind != "output":
            return h, hsp
        index = len(self.skips) - 1 - i
        if hsp.shape[1] != self.skips[index].channels:
            raise RuntimeError(f"output block {i} got a {hsp.shape[1]}-channel skip, the layout says "
                               f"{self.skips[index].channels} ({self.skips[index].name})")
        f = self.factors(h.shape[0], transformer_options, h.device)[index]
        if not f.changes_input:
            return h, hsp  # the untouched tensors: bit-exact
        import torch

        if f.freeu_acts:
            h, hsp = h.clone(), hsp.clone()
            freeu.apply_(h, hsp, f.b, f.s, active=f.freeu if torch.is_tensor(f.freeu) else None)
        if torch.is_tensor(f.rho):
            hsp = hsp * f.rho.to(hsp.dtype).reshape(-1, *[1] * (hsp.ndim - 1))
        elif f.rho != 1.0:
            hsp = hsp * f.rho
        return h, hsp


def patch_model(model: Any, schedule: RhoSchedule | str | os.PathLike, name: str | None = None) -> Any:
    """``model.clone()`` with the schedule's output block patch; ``model`` is left as it was."""
    schedule = load_schedule(schedule)
    skips = model_skips(model, schedule.skips[0].resolution)
    check_schedule(schedule, skips, name or "the schedule")
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("output_block_patch", [])
    if any(isinstance(p, OutputBlockPatch) for p in patches):
        raise ScheduleError("this MODEL has a Skip-Tuning schedule already (from another Apply Skip-Tuning schedule "
                            "node), and two would multiply: apply one schedule to the loader's MODEL",
                            option="model")
    patched = model.clone()
    patched.set_model_output_block_patch(OutputBlockPatch(schedule, skips))
    return patched


# --- the node ----------------------------------------------------------------------------------
class ApplySkipTuningSchedule:
    """Apply Skip-Tuning schedule: MODEL + a schedule file from models/skiptune/ -> patched MODEL."""

    DESCRIPTION = ("Applies a schedule file from skiptune-search (its ρ per long skip, ρ per noise level, FreeU's "
                   "factors and σ window) to a UNet model (SD 1.x, SD 2.x, SDXL). Schedule files go in "
                   "models/skiptune/.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "model_patches/unet"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {"required": {"model": ("MODEL",), "schedule": (folder_paths.get_filename_list(FOLDER),)}}

    @classmethod
    def IS_CHANGED(cls, schedule: str = "", **_: Any) -> str:
        """Run again when the file changes on disk under the same name."""
        path = _full_path(schedule, missing_ok=True)
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        return f"{schedule}:{stat.st_mtime_ns}:{stat.st_size}" if stat else schedule

    def apply(self, model: Any, schedule: str) -> tuple:
        return (patch_model(model, _full_path(schedule), name=schedule),)


def _full_path(name: str, missing_ok: bool = False) -> str | None:
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None and not missing_ok:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise ScheduleError(f"schedule file {name!r} is not in {folders}: put it there and refresh", option="schedule")
    return path


register_folder()

NODE_CLASS_MAPPINGS = {"SkipTuningApplySchedule": ApplySkipTuningSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"SkipTuningApplySchedule": "Apply Skip-Tuning schedule"}
