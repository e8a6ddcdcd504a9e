"""SkipController: multiply a UNet's long skip tensors by ρ through forward pre-hooks.

It never edits model code or weights: it finds the ordered skips through an adapter for the
model's architecture, hooks the modules that consume them, and removes every hook on exit.
Imports neither Optuna, torch-fidelity nor the CLI; diffusers only when a model needs it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .schedule import RhoSchedule, ScheduleError, SkipInfo, load_schedule


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

    Placements: ``input`` scales the skip tensor before the consuming block (what the paper
    does); ``normalized`` scales the skip channels right after that block's first GroupNorm,
    where normalization cannot cancel ρ; ``both`` does both. A σ-dependent schedule reads the
    noise level of every UNet call from its ``timestep`` argument, per sample, through
    ``timestep_to_sigma`` (taken from an EDM-style wrapper's ``sigma_from_timestep`` when the
    model has one).

    >>> ctl = SkipController(denoiser)      # discovers the skips, hooks nothing yet
    >>> with ctl.attached():                # hooks installed, ρ = 1 (exact no-op)
    ...     ctl.use(schedule)               # any RhoSchedule for this layout
    ...     images = sampler(denoiser, ...)
    """

    def __init__(self, model: Any, timestep_to_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.unet = find_unet(model)
        self.arch = type(self.unet).__name__
        self.skips, self._routes = unet2d_skips(self.unet)
        self.timestep_to_sigma = timestep_to_sigma or getattr(model, "sigma_from_timestep", None)
        self._handles: list[Any] = []
        self._schedule = RhoSchedule.identity(self.arch, self.skips)
        self._sigma: torch.Tensor | None = None  # σ of each sample in the current UNet call

    @property
    def rhos(self) -> list[float]:
        """ρ per skip of a σ-independent schedule."""
        return self._schedule.rhos_at()

    @property
    def placement(self) -> str:
        return self._schedule.placement

    def identity(self) -> RhoSchedule:
        return RhoSchedule.identity(self.arch, self.skips)

    def groupnorm_report(self) -> list[dict]:
        """For each skip: does the consuming block's GroupNorm cancel a ρ placed on its input?

        The block normalizes cat([hidden, skip]) in groups; a group holding only skip channels
        undoes any scaling of them, so ``input`` placement reaches the main branch only through
        groups that mix hidden and skip channels (and the 1x1 shortcut always sees it).
        """
        report = []
        for skip in self.skips:
            block = self.unet.get_submodule(skip.consumer)
            norm = block.norm1
            total, groups = norm.num_channels, norm.num_groups
            size = total // groups
            first_skip = total - skip.channels
            pure = sum(1 for g in range(groups) if g * size >= first_skip)
            mixed = first_skip % size != 0
            report.append({
                "groups": groups, "channels_in": total, "pure_skip_groups": pure, "mixed_group": mixed,
                "cancelled": not mixed, "shortcut": getattr(block, "conv_shortcut", None) is not None,
            })
        return report

    def use(self, schedule: RhoSchedule | str | os.PathLike) -> None:
        """Switch to another schedule (checked against this model's skip layout)."""
        schedule = load_schedule(schedule)
        schedule.check_layout(self.arch, self.skips)
        if not schedule.is_constant and self.timestep_to_sigma is None:
            raise ScheduleError(
                "this schedule depends on σ, but the controller cannot map the UNet's timestep to σ: "
                "pass SkipController(model, timestep_to_sigma=...)"
            )
        self._schedule = schedule

    # --- ρ of the current call ---------------------------------------------------------
    def _rho(self, index: int) -> float | torch.Tensor:
        """ρ of skip ``index``: a float, or a [B, 1, 1, 1] tensor for σ-dependent schedules."""
        schedule = self._schedule
        if schedule.is_constant:
            return schedule.rho[index][0]
        if self._sigma is None:
            raise RuntimeError("σ-dependent schedule used outside a UNet call")
        knots = torch.tensor(schedule.sigma_knots, dtype=torch.float64).log()
        row = torch.tensor(schedule.rho[index], dtype=torch.float64)
        x = self._sigma.double().clamp_min(1e-30).log().clamp(knots[0], knots[-1])
        k = torch.searchsorted(knots, x).clamp(1, len(knots) - 1)
        w = (x - knots[k - 1]) / (knots[k] - knots[k - 1])
        rho = row[k - 1] + w * (row[k] - row[k - 1])
        return rho.reshape(-1, 1, 1, 1)

    # --- hooks -------------------------------------------------------------------------
    def _capture_sigma(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._schedule.is_constant:
            return
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).to(torch.float64)
        sigma = self.timestep_to_sigma(t)
        self._sigma = sigma.expand(sample.shape[0]) if sigma.numel() == 1 else sigma

    def _input_hook(self, indices: list[int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self.placement == "normalized" or self._schedule.is_identity():
                return None  # exact no-op: the untouched tensors go through
            rhos = [self._rho(i) for i in indices]
            if "res_hidden_states_tuple" in kwargs:
                kwargs = dict(kwargs)
                kwargs["res_hidden_states_tuple"] = _scaled(kwargs["res_hidden_states_tuple"], rhos)
            else:
                args = (args[0], _scaled(args[1], rhos), *args[2:])
            return args, kwargs

        return hook

    def _normalized_hook(self, index: int):
        channels = self.skips[index].channels

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self.placement == "input" or self._schedule.is_identity():
                return None
            rho = self._rho(index)
            if isinstance(rho, float) and rho == 1.0:
                return None
            head, skip = output[:, :-channels], output[:, -channels:]
            return torch.cat([head, skip * (rho.to(output.dtype) if torch.is_tensor(rho) else rho)], dim=1)

        return hook

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.unet.register_forward_pre_hook(self._capture_sigma, with_kwargs=True))
        for block, indices in self._routes:
            self._handles.append(block.register_forward_pre_hook(self._input_hook(indices), with_kwargs=True))
        for index, skip in enumerate(self.skips):
            norm = self.unet.get_submodule(skip.consumer).norm1
            self._handles.append(norm.register_forward_hook(self._normalized_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sigma = None

    @contextlib.contextmanager
    def attached(self) -> Iterator["SkipController"]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()


def _scaled(tensors: tuple[torch.Tensor, ...], rhos: list) -> tuple[torch.Tensor, ...]:
    out = []
    for t, r in zip(tensors, rhos):
        if torch.is_tensor(r):
            out.append(t * r.to(device=t.device, dtype=t.dtype))
        else:
            out.append(t if r == 1.0 else t * r)
    return tuple(out)


@contextlib.contextmanager
def apply(model: Any, schedule: RhoSchedule | str | os.PathLike,
          timestep_to_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[SkipController]:
    """Sample ``model`` with ``schedule`` (a RhoSchedule or a JSON path) inside the block:

    >>> with skiptune_search.apply(pipe.unet, "best.json"):
    ...     images = pipe(num_inference_steps=10).images
    """
    controller = SkipController(model, timestep_to_sigma)
    controller.use(schedule)
    with controller.attached():
        yield controller
