"""SkipController: multiply a UNet's long skip tensors by ρ through forward pre-hooks.

It never edits model code or weights: it finds the ordered skips through an adapter for the
model's architecture, hooks the modules that consume them, and removes every hook on exit.
Imports neither Optuna, torch-fidelity nor the CLI; diffusers only when a model needs it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from .schedule import RhoSchedule, SkipInfo, load_schedule


class NoSkipsError(TypeError):
    """The model has no long skips this tool knows how to find."""


def find_unet(model: Any) -> nn.Module:
    """The diffusers UNet2DModel inside ``model`` (itself, a pipeline's ``.unet``, a wrapper's ``.net``)."""
    from diffusers import UNet2DModel

    seen = model
    for _ in range(4):
        if isinstance(seen, UNet2DModel):
            return seen
        seen = getattr(seen, "unet", None) or getattr(seen, "net", None) or getattr(seen, "model", None)
        if seen is None:
            break
    raise NoSkipsError(
        f"no supported UNet found in {type(model).__name__}: supported is diffusers UNet2DModel "
        f"(bare, a pipeline's .unet, or a wrapper's .net/.model)"
    )


def unet2d_skips(unet: nn.Module) -> tuple[list[SkipInfo], list[tuple[nn.Module, list[int]]]]:
    """The skips of a diffusers UNet2DModel in the order the encoder saves them, and for each
    up block the indices (in ``res_hidden_states_tuple`` order) of the skips it receives."""
    res = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    producers: list[tuple[str, int, int]] = [("conv_in", unet.conv_in.out_channels, res)]
    for i, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            producers.append((f"down_blocks.{i}.resnets.{j}", resnet.out_channels, res))
        if getattr(block, "downsamplers", None):
            res = (res + 1) // 2 if block.downsamplers[0].padding else res // 2
            producers.append((f"down_blocks.{i}.downsamplers.0", block.downsamplers[0].out_channels, res))
    # up blocks take the last len(resnets) of the remaining tuple; resnet k pops from its end
    remaining = list(range(len(producers)))
    consumers: dict[int, str] = {}
    routes: list[tuple[nn.Module, list[int]]] = []
    for b, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        taken, remaining = remaining[-n:], remaining[:-n]
        for k, idx in enumerate(reversed(taken)):
            consumers[idx] = f"up_blocks.{b}.resnets.{k}"
        routes.append((block, taken))
    if remaining or not producers:
        raise NoSkipsError("UNet2DModel skip bookkeeping does not add up; unsupported variant")
    skips = [SkipInfo(name, consumers[i], ch, r) for i, (name, ch, r) in enumerate(producers)]
    return skips, routes


class SkipController:
    """Scales each long skip of a model by the ρ of the schedule in use.

    >>> ctl = SkipController(unet)          # discovers the skips, hooks nothing yet
    >>> with ctl.attached():                # hooks installed, ρ = 1 (exact no-op)
    ...     ctl.use(schedule)               # any RhoSchedule for this layout
    ...     images = sampler(denoiser, ...)
    """

    def __init__(self, model: Any) -> None:
        self.unet = find_unet(model)
        self.arch = type(self.unet).__name__
        self.skips, self._routes = unet2d_skips(self.unet)
        self._handles: list[Any] = []
        self._rhos: list[float] = [1.0] * len(self.skips)

    @property
    def rhos(self) -> list[float]:
        return list(self._rhos)

    def identity(self) -> RhoSchedule:
        return RhoSchedule.identity(self.arch, self.skips)

    def use(self, schedule: RhoSchedule | str | os.PathLike) -> None:
        """Switch to another schedule (checked against this model's skip layout)."""
        schedule = load_schedule(schedule)
        schedule.check_layout(self.arch, self.skips)
        if not schedule.is_constant:
            raise NotImplementedError("σ-dependent schedules are applied from skiptune-search 0.2 on")
        self._rhos = schedule.rhos_at()

    # --- hooks -------------------------------------------------------------------------
    def _make_hook(self, indices: list[int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            rhos = [self._rhos[i] for i in indices]
            if all(r == 1.0 for r in rhos):
                return None  # exact no-op: the untouched tensors go through
            if "res_hidden_states_tuple" in kwargs:
                kwargs = dict(kwargs)
                kwargs["res_hidden_states_tuple"] = _scaled(kwargs["res_hidden_states_tuple"], rhos)
            else:
                args = (args[0], _scaled(args[1], rhos), *args[2:])
            return args, kwargs

        return hook

    def attach(self) -> None:
        if self._handles:
            return
        for block, indices in self._routes:
            self._handles.append(block.register_forward_pre_hook(self._make_hook(indices), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def attached(self) -> Iterator["SkipController"]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()


def _scaled(tensors: tuple[torch.Tensor, ...], rhos: list[float]) -> tuple[torch.Tensor, ...]:
    return tuple(t if r == 1.0 else t * r for t, r in zip(tensors, rhos))


@contextlib.contextmanager
def apply(model: Any, schedule: RhoSchedule | str | os.PathLike) -> Iterator[SkipController]:
    """Sample ``model`` with ``schedule`` (a RhoSchedule or a JSON path) inside the block:

    >>> with skiptune_search.apply(pipe.unet, "best.json"):
    ...     images = pipe(num_inference_steps=10).images
    """
    controller = SkipController(model)
    controller.use(schedule)
    with controller.attached():
        yield controller
