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

    from .schedule import SkipInfo

FACTORS = ("b1", "b2", "s1", "s2")
WINDOW_PARAMS = ("sigma_lo", "sigma_hi")  # a search's names for the window's ends
B_RANGE = (0.8, 1.8)  # backbone factors: every published preset lies inside, and 1 (off)
S_RANGE = (0.0, 1.2)  # skip low-frequency factors: likewise
RANGES = {"b1": B_RANGE, "b2": B_RANGE, "s1": S_RANGE, "s2": S_RANGE}
# σ of a model call is read back through float32 maps (EDM's c_noise, a timestep table), so it
# can miss a window end by a rounding error: the ends are widened by this relative tolerance
WINDOW_RTOL = 1e-4

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

    def __post_init__(self) -> None:
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
    @classmethod
    def from_params(cls, params: dict[str, Any], window: tuple[float, float] | None = None) -> "FreeU":
        missing = [name for name in FACTORS if name not in params]
        if missing:
            raise ScheduleError(f"FreeU needs parameters {', '.join(missing)}")
        return cls(*(float(params[name]) for name in FACTORS), window=window)

    @classmethod
    def preset(cls, name: str) -> "FreeU":
        return cls(*PRESETS[name])

    def as_json(self) -> dict:
        return {**{name: getattr(self, name) for name in FACTORS},
                "sigma_window": list(self.window) if self.window else None}

    @classmethod
    def from_json(cls, data: dict) -> "FreeU":
        window = data.get("sigma_window")
        return cls(*(data[name] for name in FACTORS), window=tuple(window) if window is not None else None)

    def enable_freeu_call(self) -> str:
        """The diffusers call with the same factors, not rounded: ``pipe.enable_freeu(s1=..., s2=..., b1=..., b2=...)``."""
        return "pipe.enable_freeu(" + ", ".join(f"{k}={float(getattr(self, k))!r}" for k in ("s1", "s2", "b1", "b2")) + ")"

    # --- per model call ----------------------------------------------------------------------
    def active(self, sigma: "torch.Tensor") -> "torch.Tensor | None":
        """Per sample: is its σ inside the window? None when there is no window (always)."""
        if self.window is None:
            return None
        lo, hi = self.window
        return (sigma >= lo * (1 - WINDOW_RTOL)) & (sigma <= hi * (1 + WINDOW_RTOL))


def stages(skips: Sequence["SkipInfo"]) -> list[int | None]:
    """FreeU's stage of each skip: 0 at the lowest resolution that has skips, 1 at the next,
    None elsewhere. A layout with skips at fewer than two resolutions has no two stages."""
    levels = sorted({s.resolution for s in skips})
    if len(levels) < 2:
        raise ScheduleError(f"FreeU needs two decoder stages (skips at two resolutions); this model's skips are all "
                            f"at {levels[0] if levels else '?'} px: tune it with a ρ family (linear, per_level, "
                            f"per_layer, per_noise)")
    return [levels.index(s.resolution) if s.resolution in levels[:2] else None for s in skips]


def per_skip(freeu: FreeU | None, skips: Sequence["SkipInfo"]) -> list[tuple[float, float] | None]:
    """(b, s) for each skip whose block FreeU changes; None where it changes nothing."""
    if freeu is None or freeu.is_identity():
        return [None] * len(skips)
    factors = [None if stage is None else freeu.stage_factors(stage) for stage in stages(skips)]
    return [None if f is None or f == (1.0, 1.0) else f for f in factors]


def apply_(hidden: "torch.Tensor", skip: "torch.Tensor", b: float, s: float,
           active: "torch.Tensor | None" = None) -> None:
    """FreeU on one consuming block's input, in place on its two parts (views of the block's
    input cat([hidden, skip]) along dim 1): the first half of ``hidden``'s channels times ``b``,
    the band around the skip's zero frequency times ``s`` (diffusers' ``fourier_filter`` with
    threshold 1), as diffusers' ``apply_freeu`` does before its cat. With ``active`` (one bool
    per sample), samples outside the σ window keep their values bit for bit. diffusers'
    ``apply_freeu`` itself is not called: it takes the stage's factors by name and has no per-sample
    window."""
    import torch

    if b != 1.0:
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
