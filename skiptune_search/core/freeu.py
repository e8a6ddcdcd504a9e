"""FreeU (Si et al., CVPR 2024) on the decoder of any UNet the adapters know.

FreeU acts on the two lowest-resolution decoder stages: in each block there that concatenates a
skip, the first half of the backbone (hidden) channels is multiplied by b (b1 at the lowest
resolution, b2 at the next) and the lowest frequencies of the skip by s (s1, s2), before the
concatenation. diffusers implements it only in its UpBlock2D and CrossAttnUpBlock2D
(``enable_freeu``); here the controller does the same from its hook on each consuming block,
whose input is cat([hidden, skip]): the same transform on the two parts of that input, so it
works on every adapter. Stage 0 holds the skips at the lowest resolution, stage 1 those at the
next: diffusers' ``resolution_idx`` 0 and 1 (its up blocks 0 and 1).

An optional σ window [σ_lo, σ_hi] limits the factors to the model calls whose σ lies inside it
(per sample), as the start/stop-step controls of Forge and A1111 do.

Two variants make it the function other UIs compute (docs/forge-a1111.md): ``version`` 2 (FreeU
v2: b scaled per pixel by the backbone's channel mean, normalized to [0, 1] per sample, so the
factor is 1 + (b - 1) * mean) and ``keyed_by`` "channels" (ComfyUI's FreeU nodes, Forge, the
sd-webui-freeu extension: a block gets b1/s1 when its backbone has 4x the base channel count,
b2/s2 when it has 2x, whatever its resolution; on Stable Diffusion that is 1280 and 640
channels, which include the first block of the next-higher stage). The default (version 1,
keyed by "stage") is diffusers' ``enable_freeu``.

Imports no torch at module level (the CLI lists ranges and presets without it). The band filter
is diffusers' ``fourier_filter`` where diffusers is installed (imported when a filter is first
applied), else ``band_filter`` here, the same computation (tests check they agree bit for bit), so
a schedule applies where diffusers is absent (a ComfyUI environment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ScheduleError

if TYPE_CHECKING:
    import torch

    from .skips import SkipInfo

FACTORS = ("b1", "b2", "s1", "s2")
WINDOW_PARAMS = ("sigma_lo", "sigma_hi")  # a search's names for the window's ends
B_RANGE = (0.8, 1.8)  # backbone factors: every published preset lies inside, and 1 (off)
S_RANGE = (0.0, 1.2)  # skip low-frequency factors: likewise
RANGES = {"b1": B_RANGE, "b2": B_RANGE, "s1": S_RANGE, "s2": S_RANGE}
# σ of a model call is read back through float32 maps (EDM's c_noise, a timestep table), so it
# can miss a window end by a rounding error: the ends are widened by this relative tolerance
WINDOW_RTOL = 1e-4

VERSIONS = (1, 2)
KEYINGS = ("stage", "channels")
# the variants a search offers -> (version, keyed_by); which UI computes each: docs/forge-a1111.md
VARIANTS = {"v1-stages": (1, "stage"), "v1-channels": (1, "channels"), "v2-channels": (2, "channels")}

# FreeU's published presets (its README), as (b1, b2, s1, s2)
PRESETS = {"SD1.4": (1.3, 1.4, 0.9, 0.2), "SD1.5": (1.5, 1.6, 0.9, 0.2), "SD2.1": (1.4, 1.6, 0.9, 0.2),
           "SDXL": (1.3, 1.4, 0.9, 0.2)}
# what recognize() tells apart -> (the preset used, why)
MODEL_PRESETS = {
    "SD1.x": ("SD1.5", "SD1.4 and SD1.5 share this layout: SD1.5's preset"),
    "SD2.x": ("SD2.1", "SD2.x layout: SD2.1's preset"),
    "SDXL": ("SDXL", "SDXL layout: SDXL's preset"),
}
FALLBACK = ("SD1.5", "no published FreeU preset for this model: SD1.5's values")


@dataclass(frozen=True)
class FreeU:
    """FreeU's four factors and an optional σ window (None: every call)."""

    b1: float = 1.0
    b2: float = 1.0
    s1: float = 1.0
    s2: float = 1.0
    window: tuple[float, float] | None = None
    version: int = 1  # 2: FreeU v2's b, scaled by the backbone's normalized channel mean
    keyed_by: str = "stage"  # "channels": b1/s1 where the backbone has 4x the base channels, b2/s2 at 2x

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version not in VERSIONS:
            raise ScheduleError(f"FreeU version {self.version!r} is unknown: use 1 (diffusers' FreeU) or 2 (FreeU v2)")
        if self.keyed_by not in KEYINGS:
            raise ScheduleError(f"FreeU keyed_by {self.keyed_by!r} is unknown: use 'stage' (diffusers) or 'channels' "
                                f"(ComfyUI, Forge, sd-webui-freeu)")
        for name in FACTORS:
            value, (lo, hi) = getattr(self, name), RANGES[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ScheduleError(f"FreeU {name} = {value!r} is outside [{lo:g}, {hi:g}]: set it inside that range")
        if self.window is not None:
            ends = tuple(self.window)
            if (len(ends) != 2 or any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in ends)
                    or not all(math.isfinite(e) and e > 0 for e in ends)):
                raise ScheduleError(f"FreeU σ window {list(ends)!r} must be two positive, finite σ [σ_lo, σ_hi], "
                                   f"or null for FreeU at every σ")
            if ends[0] >= ends[1]:
                raise ScheduleError(f"FreeU σ window [{ends[0]:g}, {ends[1]:g}] is empty: need σ_lo < σ_hi (swap the "
                                   f"ends, or null for FreeU at every σ)")
            object.__setattr__(self, "window", (float(ends[0]), float(ends[1])))

    def is_identity(self) -> bool:
        return all(getattr(self, name) == 1.0 for name in FACTORS)

    def stage_factors(self, stage: int) -> tuple[float, float]:
        """(b, s) of stage 0 (the lowest resolution) or 1."""
        return (self.b1, self.s1) if stage == 0 else (self.b2, self.s2)

    # --- construction and JSON -----------------------------------------------------------
    @property
    def variant(self) -> str:
        """The name of this (version, keyed_by) in ``VARIANTS`` ('v2-stages' is not offered)."""
        return next((k for k, v in VARIANTS.items() if v == (self.version, self.keyed_by)),
                    f"v{self.version}-{self.keyed_by}")

    @classmethod
    def from_params(cls, params: dict[str, Any], window: tuple[float, float] | None = None,
                    variant: str = "v1-stages") -> "FreeU":
        missing = [name for name in FACTORS if name not in params]
        if missing:
            raise ScheduleError(f"FreeU needs parameters {', '.join(missing)}")
        if variant not in VARIANTS:
            raise ScheduleError(f"unknown FreeU variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        version, keyed_by = VARIANTS[variant]
        return cls(*(float(params[name]) for name in FACTORS), window=window, version=version, keyed_by=keyed_by)

    @classmethod
    def preset(cls, name: str) -> "FreeU":
        return cls(*PRESETS[name])

    def as_json(self) -> dict:
        """The factors and window; ``version`` and ``keyed_by`` only where they are not diffusers'
        (so a diffusers-style FreeU file reads as every earlier version wrote it)."""
        variant = {k: getattr(self, k) for k, default in (("version", 1), ("keyed_by", "stage"))
                   if getattr(self, k) != default}
        return {**{name: getattr(self, name) for name in FACTORS},
                "sigma_window": list(self.window) if self.window else None, **variant}

    @classmethod
    def from_json(cls, data: dict) -> "FreeU":
        window = data.get("sigma_window")
        return cls(*(data[name] for name in FACTORS), window=tuple(window) if window is not None else None,
                   version=data.get("version", 1), keyed_by=data.get("keyed_by", "stage"))

    def enable_freeu_call(self) -> str:
        """The diffusers call with the same factors, not rounded: ``pipe.enable_freeu(s1=..., s2=..., b1=..., b2=...)``."""
        return "pipe.enable_freeu(" + ", ".join(f"{k}={float(getattr(self, k))!r}" for k in ("s1", "s2", "b1", "b2")) + ")"

    # --- per model call ----------------------------------------------------------------------
    def bounds(self) -> tuple[float, float]:
        """The σ a model call may have for FreeU to act: the window widened by its tolerance
        (every σ without a window)."""
        if self.window is None:
            return 0.0, math.inf
        lo, hi = self.window
        return lo * (1 - WINDOW_RTOL), hi * (1 + WINDOW_RTOL)

    def active(self, sigma: "torch.Tensor") -> "torch.Tensor | None":
        """Per sample: is its σ inside the window? None when there is no window (always)."""
        if self.window is None:
            return None
        lo, hi = self.bounds()
        return (sigma >= lo) & (sigma <= hi)


def stages(skips: Sequence["SkipInfo"]) -> list[int | None]:
    """FreeU's stage of each skip: 0 at the lowest resolution that has skips, 1 at the next,
    None elsewhere. A layout with skips at fewer than two resolutions has no two stages."""
    levels = sorted({s.resolution for s in skips})
    if len(levels) < 2:
        raise ScheduleError(f"FreeU needs two decoder stages (skips at two resolutions); this model's skips are all "
                            f"at {levels[0] if levels else '?'} px: tune it with a ρ family (linear, per_level, "
                            f"per_layer, per_noise)")
    return [levels.index(s.resolution) if s.resolution in levels[:2] else None for s in skips]


def channel_stages(skips: Sequence["SkipInfo"], hidden: Sequence[int | None]) -> list[int | None]:
    """FreeU's stage of each skip's block keyed by channel count, as ComfyUI's FreeU nodes, Forge
    and sd-webui-freeu key it: 0 where the block's backbone (``hidden[i]`` channels) has 4x the
    base channel count (the outermost skip's channels: ComfyUI's ``model_channels``), 1 where it
    has 2x, None elsewhere."""
    base = skips[0].channels
    if any(h is None for h in hidden):
        raise ScheduleError("FreeU keyed by channel count needs the backbone channels of every decoder block that "
                            "takes a skip, which this model's blocks do not say: use FreeU keyed by stage")
    found = [{4 * base: 0, 2 * base: 1}.get(h) for h in hidden]
    if all(f is None for f in found):
        raise ScheduleError(f"FreeU keyed by channel count acts where a block's backbone has {4 * base} or "
                            f"{2 * base} channels (4x and 2x the base {base}); no block of this model has: use "
                            f"FreeU keyed by stage")
    return found


def per_skip(freeu: FreeU | None, skips: Sequence["SkipInfo"],
             hidden: Sequence[int | None] | None = None) -> list[tuple[float, float] | None]:
    """(b, s) for each skip whose block FreeU changes; None where it changes nothing. ``hidden``:
    the backbone channels of each skip's block, needed when FreeU is keyed by channel count."""
    if freeu is None or freeu.is_identity():
        return [None] * len(skips)
    if freeu.keyed_by == "channels":
        keyed = channel_stages(skips, hidden if hidden is not None else [None] * len(skips))
    else:
        keyed = stages(skips)
    factors = [None if stage is None else freeu.stage_factors(stage) for stage in keyed]
    return [None if f is None or f == (1.0, 1.0) else f for f in factors]


def v2_factor(hidden: "torch.Tensor", b: float) -> "torch.Tensor":
    """FreeU v2's backbone factor per sample and pixel, [B, 1, H, W]: 1 + (b - 1) * m, where m is
    the mean over ``hidden``'s channels, min-max normalized over each sample's pixels (as Forge's
    ``patch_freeu_v2``, ComfyUI's FreeU_V2 and sd-webui-freeu's version 2 compute it)."""
    mean = hidden.mean(1, keepdim=True)
    flat = mean.reshape(mean.shape[0], -1)
    lo = flat.min(dim=-1, keepdim=True).values.reshape(-1, 1, 1, 1)
    hi = flat.max(dim=-1, keepdim=True).values.reshape(-1, 1, 1, 1)
    return (b - 1) * ((mean - lo) / (hi - lo)) + 1


def apply_(hidden: "torch.Tensor", skip: "torch.Tensor", b: float, s: float,
           active: "torch.Tensor | None" = None, version: int = 1) -> None:
    """FreeU on one consuming block's input, in place on its two parts (views of the block's
    input cat([hidden, skip]) along dim 1): the first half of ``hidden``'s channels times ``b``,
    the band around the skip's zero frequency times ``s`` (diffusers' ``fourier_filter`` with
    threshold 1), as diffusers' ``apply_freeu`` does before its cat. With ``active`` (one bool
    per sample), samples outside the σ window keep their values bit for bit. diffusers'
    ``apply_freeu`` itself is not called: it takes the stage's factors by name and has no per-sample
    window. ``version`` 2: the first half times FreeU v2's factor (``v2_factor``) instead of b."""
    import torch

    if b != 1.0:
        if version == 2:
            factor = v2_factor(hidden, b)
            if active is not None:
                factor = torch.where(active.reshape(-1, 1, 1, 1), factor, torch.ones_like(factor))
        else:
            factor = b if active is None else torch.where(active, b, 1.0).to(hidden.dtype).reshape(-1, 1, 1, 1)
        half = hidden.shape[1] // 2
        hidden[:, :half].mul_(factor)
    if s != 1.0:
        filtered = fourier_filter(skip, threshold=1, scale=s)
        skip.copy_(filtered if active is None else torch.where(active.reshape(-1, 1, 1, 1), filtered, skip))


def band_filter(x: "torch.Tensor", threshold: int, scale: float) -> "torch.Tensor":
    """FreeU's Fourier filter on [B, C, H, W] features: the centred band of 2·threshold frequencies a
    side around the zero frequency times ``scale``, in float32 (FFT has no bfloat16 and only an
    unstable float16), returned in ``x``'s dtype. The computation of diffusers' ``fourier_filter``,
    for where diffusers is not installed."""
    import torch

    spectrum = torch.fft.fftshift(torch.fft.fftn(x.to(torch.float32), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    spectrum[..., h - threshold:h + threshold, w - threshold:w + threshold] *= scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


_FILTER: list = []  # the filter in use, found at the first call


def fourier_filter(x: "torch.Tensor", threshold: int, scale: float) -> "torch.Tensor":
    """diffusers' ``fourier_filter`` (the filter FreeU was published with) where diffusers is
    installed, else ``band_filter``."""
    if not _FILTER:
        try:
            from diffusers.utils.torch_utils import fourier_filter as filter_
        except ImportError:
            filter_ = band_filter
        _FILTER.append(filter_)
    return _FILTER[0](x, threshold=threshold, scale=scale)


def recognize(unet: Any) -> str | None:
    """The Stable Diffusion family of a diffusers UNet2DConditionModel from its config (a key of
    ``MODEL_PRESETS``), or None."""
    if type(unet).__name__ != "UNet2DConditionModel":
        return None
    config = unet.config
    blocks, cross = tuple(config.block_out_channels), config.cross_attention_dim
    if config.in_channels != 4:
        return None
    if blocks == (320, 640, 1280, 1280) and cross == 768:
        return "SD1.x"
    if blocks == (320, 640, 1280, 1280) and cross == 1024:
        return "SD2.x"
    if blocks == (320, 640, 1280) and cross == 2048 and getattr(config, "addition_embed_type", None) == "text_time":
        return "SDXL"
    return None


def preset_for(model_family: str | None) -> tuple[str, FreeU, str]:
    """The preset for a ``recognize`` result: its name, its factors and why it was chosen."""
    name, why = MODEL_PRESETS.get(model_family or "", FALLBACK)
    return name, FreeU.preset(name), why
