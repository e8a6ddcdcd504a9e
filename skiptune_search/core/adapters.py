"""Architecture adapters: where a UNet's long skips are made and where they are consumed.

An adapter turns a model into a ``Layout``: the ordered skips (index 0 = outermost, the first
tensor the encoder saves) and, for each, the block that consumes it, where the skip enters that
block (a ``SkipEntry``) and the block's first normalization, if it has one. In the convolutional
UNets (diffusers, EDM, EDM2) the consuming block's first input is ``cat([hidden, skip], dim=1)``,
so the skip is its trailing ``channels`` channels; U-ViT's decoder blocks take the skip as an
argument of its own. Users register adapters for other architectures with ``register_adapter``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import NoSkipsError
from .skips import SkipInfo


@dataclass(frozen=True)
class SkipEntry:
    """Where a skip enters its consumer: in the argument at position ``arg`` (or the keyword
    ``name`` when it is passed by keyword; ``None``: the first keyword of a keywords-only call),
    its channels along dimension ``dim``, either as the trailing ``channels`` of that argument
    (``whole=False``: the argument is cat([hidden, skip], dim)) or as the whole argument
    (``whole=True``: the consumer is called block(hidden, skip))."""

    arg: int = 0
    name: str | None = None
    dim: int = 1
    whole: bool = False


CONCATENATED = SkipEntry()  # the consumer's first input is cat([hidden, skip], dim=1)


@dataclass
class Layout:
    """The skips of one UNet and the modules the controller hooks."""

    arch: str
    unet: nn.Module
    skips: list[SkipInfo]
    consumers: list[nn.Module]  # per skip: the block the skip enters
    norms: list[nn.Module | None]  # per skip: that block's first normalization (None: it has none)
    noise_arg: tuple[int, str]  # position and name of the noise-level argument of unet.forward
    entries: list[SkipEntry] = field(default_factory=list)  # per skip: where it enters (default CONCATENATED)

    def __post_init__(self) -> None:
        self.entries = list(self.entries) or [CONCATENATED] * len(self.skips)
        if not len(self.skips) == len(self.consumers) == len(self.norms) == len(self.entries):
            raise NoSkipsError(f"{self.arch}: the layout lists {len(self.skips)} skips, {len(self.consumers)} "
                               f"consumers, {len(self.norms)} norms and {len(self.entries)} entries")

    @property
    def has_norms(self) -> bool:
        """Does every consumer normalize its input first (what placements other than input need)?"""
        return all(norm is not None for norm in self.norms)


def _stack_layout(net: nn.Module, producers: list[tuple[str, int, int]], consumer_of: dict[int, str],
                  stack: list[int], norm: str | None, noise_arg: tuple[int, str]) -> Layout:
    """The layout of a UNet whose forward pushes each producer's output (name, channels,
    resolution) on a stack that its decoder pops, once every skip has its consumer; ``norm`` names
    the consumers' first normalization (None: they have none)."""
    if stack:
        raise NoSkipsError(f"{type(net).__name__}: {len(stack)} saved skips are never consumed")
    skips = [SkipInfo(name, consumer_of[i], ch, r) for i, (name, ch, r) in enumerate(producers)]
    consumers = [net.get_submodule(s.consumer) for s in skips]
    norms = [getattr(c, norm) if norm else None for c in consumers]
    return Layout(type(net).__name__, net, skips, consumers, norms, noise_arg)


# --- diffusers UNet2DModel and UNet2DConditionModel -----------------------------------------
def _is_diffusers_unet(module: nn.Module) -> bool:
    return type(module).__name__ in {"UNet2DModel", "UNet2DConditionModel"} and hasattr(module, "up_blocks")


def diffusers_layout(unet: nn.Module) -> Layout:
    """UNet.forward saves conv_in's output, then each down block's resnet (and attention) outputs
    and its downsampler output; up block b takes the last len(resnets) saved tensors, and its
    resnet k concatenates the one at the end (a stack)."""
    size = unet.config.sample_size
    res = int(size if isinstance(size, int) else size[0])
    producers: list[tuple[str, int, int]] = [("conv_in", unet.conv_in.out_channels, res)]
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j, resnet in enumerate(block.resnets):
            # with attention, the saved tensor is the attention's output, not the resnet's
            part = f"attentions.{j}" if j < len(attentions) else f"resnets.{j}"
            producers.append((f"down_blocks.{i}.{part}", resnet.out_channels, res))
        if getattr(block, "downsamplers", None):
            res = (res + 1) // 2 if getattr(block.downsamplers[0], "padding", 1) else res // 2
            producers.append((f"down_blocks.{i}.downsamplers.0", block.downsamplers[0].out_channels, res))
    stack = list(range(len(producers)))
    consumer_of: dict[int, str] = {}
    for b, block in enumerate(unet.up_blocks):
        for k in range(len(block.resnets)):
            if not stack:
                raise NoSkipsError(f"{type(unet).__name__}: more decoder resnets than saved skips")
            consumer_of[stack.pop()] = f"up_blocks.{b}.resnets.{k}"
    return _stack_layout(unet, producers, consumer_of, stack, "norm1", (1, "timestep"))


# --- EDM SongUNet and DhariwalUNet (NVlabs/edm training/networks.py) ------------------------
def _is_edm_unet(module: nn.Module) -> bool:
    return (type(module).__name__ in {"SongUNet", "DhariwalUNet"}
            and isinstance(getattr(module, "enc", None), nn.ModuleDict)
            and isinstance(getattr(module, "dec", None), nn.ModuleDict))


def _edm_out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return int(block.out_channels)
    return int(block.weight.shape[0])  # a bare conv layer


def edm_layout(net: nn.Module) -> Layout:
    """EDM's forward appends every encoder output to ``skips``; a decoder block whose
    ``in_channels`` differ from the running channel count gets ``cat([x, skips.pop()])``.
    Encoder names start with the resolution ('32x32_block0')."""
    producers = []
    for name, block in net.enc.items():
        if "aux" in name:  # SongUNet's auxiliary encoder path (NCSN++): folds into the last skip, adds none
            continue
        match = re.match(r"(\d+)x\d+_", name)
        if not match:
            raise NoSkipsError(f"{type(net).__name__}: encoder entry {name!r} has no resolution prefix")
        producers.append((f"enc.{name}", _edm_out_channels(block), int(match.group(1))))
    stack = list(range(len(producers)))
    channels = producers[-1][1]
    consumer_of: dict[int, str] = {}
    for name, block in net.dec.items():
        if "aux" in name:  # SongUNet's auxiliary output path: no skips
            continue
        if block.in_channels != channels:
            if not stack:
                raise NoSkipsError(f"{type(net).__name__}: decoder block {name} wants a skip, none left")
            i = stack.pop()
            if channels + producers[i][1] != block.in_channels:
                raise NoSkipsError(f"{type(net).__name__}: decoder block {name} channels do not add up")
            consumer_of[i] = f"dec.{name}"
        channels = block.out_channels
    return _stack_layout(net, producers, consumer_of, stack, "norm0", (1, "noise_labels"))


# --- EDM2 UNet (NVlabs/edm2 training/networks_edm2.py) ------------------------------------
def is_edm2_unet(module: nn.Module) -> bool:
    """EDM2's magnitude-preserving UNet: class ``UNet`` with ``enc``/``dec`` ModuleDicts and the
    ``concat_balance`` its decoder's mp_cat uses."""
    return (type(module).__name__ == "UNet" and hasattr(module, "concat_balance")
            and isinstance(getattr(module, "enc", None), nn.ModuleDict)
            and isinstance(getattr(module, "dec", None), nn.ModuleDict))


def edm2_layout(net: nn.Module) -> Layout:
    """EDM2's forward appends every encoder output to ``skips`` (the first conv's included); before
    each decoder entry whose name contains 'block' it computes ``x = mp_cat(x, skips.pop())``, so the
    skip is the trailing channels of that block's input, already weighted by mp_cat (ρ multiplies on
    top of that weight). Its decoder blocks normalize nothing at their input (the pixel norm is in
    the encoder flavour only): no norms, so only the input placement applies."""
    producers = []
    for name, block in net.enc.items():
        match = re.match(r"(\d+)x\d+_", name)
        if not match:
            raise NoSkipsError(f"{type(net).__name__}: encoder entry {name!r} has no resolution prefix")
        producers.append((f"enc.{name}", int(block.out_channels), int(match.group(1))))
    stack = list(range(len(producers)))
    channels = producers[-1][1]
    consumer_of: dict[int, str] = {}
    for name, block in net.dec.items():
        if "block" in name:
            if not stack:
                raise NoSkipsError(f"{type(net).__name__}: decoder block {name} wants a skip, none left")
            i = stack.pop()
            # a decoder block's first conv (and its 1x1 conv_skip) takes the concatenated channels
            if channels + producers[i][1] != block.conv_res0.weight.shape[1]:
                raise NoSkipsError(f"{type(net).__name__}: decoder block {name} channels do not add up")
            consumer_of[i] = f"dec.{name}"
        channels = int(block.out_channels)
    return _stack_layout(net, producers, consumer_of, stack, None, (1, "noise_labels"))


# --- U-ViT (baofff/U-ViT libs/uvit.py) ----------------------------------------------------
UVIT_ENTRY = SkipEntry(arg=1, name="skip", dim=-1, whole=True)  # blk(x, skip): tokens [B, L, D]


def is_uvit(module: nn.Module) -> bool:
    return (type(module).__name__ == "UViT" and isinstance(getattr(module, "in_blocks", None), nn.ModuleList)
            and isinstance(getattr(module, "out_blocks", None), nn.ModuleList)
            and isinstance(getattr(module, "mid_block", None), nn.Module))


def uvit_layout(net: nn.Module) -> Layout:
    """U-ViT's forward appends each ``in_blocks`` output (tokens [B, L, D]) to ``skips``; each
    ``out_blocks`` entry is called ``blk(x, skips.pop())`` and first computes
    ``skip_linear(cat([x, skip], dim=-1))``: the skip is an argument of its own, its channels the
    last dimension, and nothing normalizes it before that linear layer (no norms). Every skip has
    the token grid's size, (number of patch tokens)^½ a side."""
    name = type(net).__name__
    depth = len(net.in_blocks)
    if depth == 0 or len(net.out_blocks) != depth:
        raise NoSkipsError(f"{name}: {depth} in_blocks and {len(net.out_blocks)} out_blocks; a long skip pairs one of each")
    width = int(net.pos_embed.shape[-1])
    side = math.isqrt(int(net.pos_embed.shape[1]) - int(getattr(net, "extras", 1)))
    for k, block in enumerate(net.out_blocks):
        linear = getattr(block, "skip_linear", None)
        if linear is None:
            raise NoSkipsError(f"{name}: out_blocks.{k} has no skip_linear (a U-ViT built with skip=False has no long skips)")
        if int(linear.weight.shape[1]) != 2 * width:
            raise NoSkipsError(f"{name}: out_blocks.{k}.skip_linear takes {linear.weight.shape[1]} features, not 2 x {width}")
    skips = [SkipInfo(f"in_blocks.{i}", f"out_blocks.{depth - 1 - i}", width, side) for i in range(depth)]
    consumers = [net.get_submodule(s.consumer) for s in skips]
    return Layout(name, net, skips, consumers, [None] * depth, (1, "timesteps"), [UVIT_ENTRY] * depth)


# --- registry ---------------------------------------------------------------------------
ADAPTERS: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], Layout]]] = [
    ("diffusers UNet2DModel / UNet2DConditionModel", _is_diffusers_unet, diffusers_layout),
    ("EDM SongUNet / DhariwalUNet", _is_edm_unet, edm_layout),
    ("EDM2 UNet", is_edm2_unet, edm2_layout),
    ("U-ViT", is_uvit, uvit_layout),
]


def register_adapter(name: str, matches: Callable[[nn.Module], bool], layout: Callable[[nn.Module], Layout]) -> None:
    """Teach the controller another architecture: ``matches(module)`` picks the UNet,
    ``layout(unet)`` returns its ``Layout``. Tried before the built-in adapters."""
    ADAPTERS.insert(0, (name, matches, layout))


def _children(model: Any) -> list[Any]:
    """Where a UNet hides: a pipeline's .unet, a wrapper's .net, an EDM Precond's .model."""
    return [getattr(model, a) for a in ("unet", "net", "model") if isinstance(getattr(model, a, None), nn.Module)]


def find_layout(model: Any) -> tuple[Layout, list[nn.Module]]:
    """The layout of the UNet inside ``model`` and the chain of wrappers around it (outermost first)."""
    chain: list[Any] = []
    frontier = [model]
    for _ in range(4):
        next_frontier = []
        for candidate in frontier:
            for _, matches, layout in ADAPTERS:
                if isinstance(candidate, nn.Module) and matches(candidate):
                    return layout(candidate), [m for m in chain if isinstance(m, nn.Module)]
            next_frontier += _children(candidate)
            chain.append(candidate)
        frontier = next_frontier
    supported = "; ".join(name for name, _, _ in ADAPTERS)
    raise NoSkipsError(
        f"no UNet with long skips found in {type(model).__name__}: supported are {supported} (bare, a "
        f"pipeline's .unet, or a wrapper's .net/.model); register others with "
        f"skiptune_search.core.adapters.register_adapter"
    )
