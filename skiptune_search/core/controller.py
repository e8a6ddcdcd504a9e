"""SkipController: multiply a UNet's long skip tensors by ρ through forward hooks.

It never edits model code or weights: it finds the ordered skips through an adapter for the
model's architecture (``adapters.py``), hooks the blocks that consume them, and removes every
hook on exit. Imports nothing of the package outside ``core``: neither Optuna, torch-fidelity
nor the CLI.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import freeu
from .adapters import find_layout
from .errors import NoSkipsError, ScheduleError
from .schedule import PLACEMENTS, BlockFactors, RhoSchedule, load_schedule

__all__ = ["NoSkipsError", "SkipController", "apply"]


class SkipController:
    """Scales each long skip of a model by the ρ of the schedule in use.

    Placements: ``input`` scales the skip channels of the consuming block's input (what the
    paper does); ``normalized`` scales them right after that block's first normalization, which
    therefore cannot cancel ρ; ``both`` does both. A schedule's FreeU factors (``freeu.py``) act
    on the consuming block's input whatever the placement, before ρ. A σ-dependent schedule (ρ
    between σ knots, or FreeU in a σ window) needs each call's noise level, per sample. Where σ
    comes from: the UNet's own timestep argument mapped through ``timestep_to_sigma`` when there
    is such a map (the one given, else the wrapper's ``sigma_from_timestep``: EDM's c_noise =
    ln(σ)/4, a VP model's σ table), so loops that call the UNet directly work too; else the
    ``sigma`` argument of an EDM-style ``*Precond`` wrapper.

    >>> ctl = SkipController(denoiser)      # discovers the skips, hooks nothing yet
    >>> with ctl.attached():                # hooks installed, ρ = 1 (exact no-op)
    ...     ctl.use(schedule)               # any RhoSchedule for this layout
    ...     images = sampler(denoiser, ...)
    """

    def __init__(self, model: Any, timestep_to_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.layout, wrappers = find_layout(model)
        self.unet = self.layout.unet
        self.arch = self.layout.arch
        self.skips = self.layout.skips
        self._precond = next((w for w in wrappers if type(w).__name__.endswith("Precond")), None)
        # σ from the UNet's own timestep when the map is known (so loops that call the UNet
        # directly work too), else from the sigma argument of the Precond wrapper
        self.timestep_to_sigma = timestep_to_sigma or getattr(self._precond, "sigma_from_timestep", None)
        self._handles: list[Any] = []
        self._sigma: torch.Tensor | None = None  # σ of each sample in the current UNet call
        self._factors: list[BlockFactors] | None = None  # per skip: ρ and FreeU's factors at that σ
        self._hidden = self.hidden_channels()  # the backbone's channels per skip, for FreeU keyed by channels
        self._set(RhoSchedule.identity(self.arch, self.skips))

    @property
    def schedule(self) -> RhoSchedule:
        """The schedule in use."""
        return self._schedule

    @property
    def rhos(self) -> list[float]:
        """ρ per skip of a σ-independent schedule."""
        return self._schedule.rhos_at()

    @property
    def placement(self) -> str:
        return self._schedule.placement

    @property
    def knows_sigma(self) -> bool:
        """Whether each call's σ can be read: from a Precond wrapper, or the UNet's timestep
        mapped by ``timestep_to_sigma`` (σ-dependent schedules need it)."""
        return self._precond is not None or self.timestep_to_sigma is not None

    def identity(self) -> RhoSchedule:
        return RhoSchedule.identity(self.arch, self.skips)

    def groupnorm_report(self) -> list[dict]:
        """For each skip: does the consuming block's GroupNorm cancel a ρ placed on its input?

        The block normalizes cat([hidden, skip]) in groups; a group holding only skip channels
        undoes any scaling of them, so ``input`` placement reaches the main branch only through
        groups that mix hidden and skip channels (and a 1x1 shortcut conv always sees it). A block
        with no normalization at its input (EDM2, U-ViT) cancels nothing: ``normalization`` is
        False and the group counts are None.
        """
        report = []
        for skip, block, norm in zip(self.skips, self.layout.consumers, self.layout.norms):
            shortcut = any(isinstance(getattr(block, a, None), nn.Module) for a in ("conv_shortcut", "skip", "conv_skip"))
            if norm is None:
                report.append({"normalization": False, "groups": None, "channels_in": None, "pure_skip_groups": None,
                               "mixed_group": None, "cancelled": False, "shortcut": shortcut})
                continue
            total = int(getattr(norm, "num_channels", None) or norm.weight.shape[0])  # EDM's GroupNorm has no num_channels
            groups = int(norm.num_groups)
            size = total // groups
            first_skip = total - skip.channels
            mixed = first_skip % size != 0
            report.append({
                "normalization": True, "groups": groups, "channels_in": total,
                "pure_skip_groups": sum(1 for g in range(groups) if g * size >= first_skip),
                "mixed_group": mixed, "cancelled": not mixed, "shortcut": shortcut,
            })
        return report

    @property
    def placements(self) -> tuple[str, ...]:
        """The placements this model allows: all of them when every consumer normalizes its
        input first, else only ``input``."""
        return PLACEMENTS if self.layout.has_norms else ("input",)

    def check_placement(self, placement: str) -> None:
        """A one-line ScheduleError when ``placement`` needs a normalization this model lacks."""
        if placement in self.placements:
            return
        if placement not in PLACEMENTS:
            raise ScheduleError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}",
                                option="placement")
        bare = next(s.consumer for s, n in zip(self.skips, self.layout.norms) if n is None)
        raise ScheduleError(
            f"placement {placement!r} scales the skip after its block's first normalization, but {self.arch} has no "
            f"normalization at the decoder input (e.g. {bare} takes the skip as it is): use placement 'input'",
            option="placement")

    def use(self, schedule: RhoSchedule | str | os.PathLike) -> None:
        """Switch to another schedule (checked against this model's skip layout)."""
        schedule = load_schedule(schedule)
        schedule.check_layout(self.arch, self.skips)
        self.check_placement(schedule.placement)
        if schedule.freeu is not None:
            self._check_freeu_entries(schedule)
        if schedule.depends_on_sigma and not self.knows_sigma:
            raise ScheduleError(
                "this schedule depends on σ (ρ per σ knot, or a FreeU σ window), but the UNet is called with "
                "timesteps: pass timestep_to_sigma (apply(model, schedule, timestep_to_sigma=...); for a diffusers "
                "pipeline timestep_to_sigma_from_scheduler(pipe.scheduler)) or the model inside its Precond wrapper"
            )
        self._set(schedule)

    def _set(self, schedule: RhoSchedule) -> None:
        """Take a schedule, with what the hooks need of it computed once, not at every call: its
        factors when they do not depend on σ, else (per call) ``RhoSchedule.factors_at``."""
        self._schedule = schedule
        self._identity = schedule.is_identity()
        self._static = None if schedule.depends_on_sigma else schedule.factors_at(hidden=self._hidden)
        self._factors = self._static

    # --- factors of the current call -----------------------------------------------------
    def _factors_of(self, index: int) -> BlockFactors:
        """ρ and FreeU's factors of skip ``index`` in this call (ρ one per sample, a [B] tensor,
        for a σ-dependent schedule)."""
        if self._factors is None:
            raise RuntimeError("σ-dependent schedule used outside a model call")
        return self._factors[index]

    def _rho(self, index: int) -> float | torch.Tensor:
        """ρ of skip ``index`` in this call: a float, or one per sample (a [B] tensor)."""
        return self._factors_of(index).rho

    def _scale_skip(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """``x`` with the part of it that is skip ``index`` times ρ (where the layout's entry says:
        its trailing channels along a dimension, or all of it); None when ρ is 1."""
        rho = self._rho(index)
        if not torch.is_tensor(rho):
            if rho == 1.0:
                return None
        else:  # one ρ per sample, interpolated in float64
            rho = rho.to(dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        entry = self.layout.entries[index]
        if entry.whole:
            # the producer's own output, which the network may still hold: scaled into a copy
            return x * rho
        c, dim = self.skips[index].channels, entry.dim % x.ndim
        start = x.shape[dim] - c
        if not x.requires_grad:
            # x is the consumer's own fresh input (the decoder's cat, or the norm's output):
            # scaling its skip channels in place spares a copy of the whole tensor
            x.narrow(dim, start, c).mul_(rho)
            return x
        return torch.cat([x.narrow(dim, 0, start), x.narrow(dim, start, c) * rho], dim=dim)  # autograd: leave x as it was

    # --- hooks -------------------------------------------------------------------------
    def _capture_sigma(self, source: str):
        position, name = (1, "sigma") if source == "precond" else self.layout.noise_arg

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._schedule.depends_on_sigma:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            value = kwargs[name] if name in kwargs else args[position]
            value = torch.as_tensor(value, device=x.device).reshape(-1).to(torch.float64)
            sigma = value if source == "precond" else self.timestep_to_sigma(value)
            self._sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
            # every skip's ρ (interpolated in log σ, clamped outside the knots) and FreeU's window,
            # per sample, once per call
            self._factors = self._schedule.factors_at(self._sigma.to(x.device), hidden=self._hidden)

        return hook

    def _forget_sigma(self, module: nn.Module, args: tuple, output) -> None:
        self._sigma, self._factors = None, self._static

    def hidden_channels(self) -> list[int | None]:
        """The backbone channels of each skip's consumer (its ``in_channels`` less the skip's, where
        the skip is concatenated and the block says its input channels), for FreeU keyed by
        channel count; None where unknown."""
        return [block.in_channels - skip.channels
                if isinstance(getattr(block, "in_channels", None), int) and not entry.whole else None
                for block, skip, entry in zip(self.layout.consumers, self.skips, self.layout.entries)]

    def _check_freeu_entries(self, schedule: RhoSchedule) -> None:
        """FreeU splits a consumer's input into backbone and skip channels: only where the skip is
        the trailing channels of a [B, C, H, W] input."""
        try:
            keyed = freeu.per_skip(schedule.freeu, schedule.skips, self._hidden)
        except ScheduleError as exc:  # keyed by channels on a model without such blocks
            raise ScheduleError(f"{self.arch}: {exc}") from None
        for index, factors in enumerate(keyed):
            entry = self.layout.entries[index]
            if factors is not None and (entry.whole or entry.dim not in (1, -3)):
                raise ScheduleError(f"FreeU scales backbone channels and filters skip features in space, but "
                                    f"{self.arch} passes skip {index} ({self.skips[index].name}) to "
                                    f"{self.skips[index].consumer} "
                                    f"{'as an argument of its own' if entry.whole else 'along dimension ' + str(entry.dim)}"
                                    f"; use a ρ family on this model")

    def _transform_input(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """The consuming block's input with FreeU's factors and (``input``, ``both``) ρ applied;
        None when neither changes it."""
        changed = None
        # --- FreeU (core/freeu.py): one call on the (hidden, skip) views of the input ------------
        factors = self._factors_of(index)
        if factors.freeu_acts:
            if x.requires_grad:
                x = x.clone()  # autograd: leave the block's input as it was, change a copy
            c = self.skips[index].channels
            active = factors.freeu if torch.is_tensor(factors.freeu) else None
            freeu.apply_(x[:, :-c], x[:, -c:], factors.b, factors.s, active=active,
                         version=self._schedule.freeu.version)
            changed = x
        # ------------------------------------------------------------------------------------------
        if self.placement == "normalized":
            return changed
        scaled = self._scale_skip(x, index)
        return changed if scaled is None else scaled

    def _input_hook(self, index: int):
        entry = self.layout.entries[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._identity:
                return None  # exact no-op: the untouched tensors go through
            if entry.arg < len(args):
                scaled = self._transform_input(args[entry.arg], index)
                return None if scaled is None else ((*args[:entry.arg], scaled, *args[entry.arg + 1:]), kwargs)
            # passed by keyword (a keywords-only call of a first-input entry: its first keyword)
            key = entry.name if entry.name is not None else next(iter(kwargs))
            if kwargs.get(key) is None:
                raise RuntimeError(f"{self.skips[index].consumer} was called without its skip (argument "
                                   f"{entry.arg}, {key!r}): the {self.arch} layout does not fit this call")
            scaled = self._transform_input(kwargs[key], index)
            return None if scaled is None else (args, {**kwargs, key: scaled})

        return hook

    def _normalized_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self.placement == "input" or self._identity:
                return None
            return self._scale_skip(output, index)

        return hook

    def attach(self) -> None:
        if self._handles:
            return
        source = (self.unet, "unet") if self.timestep_to_sigma is not None else (self._precond, "precond")
        if source[0] is not None:
            self._handles.append(source[0].register_forward_pre_hook(self._capture_sigma(source[1]), with_kwargs=True))
            # σ belongs to one call: a later call of the bare UNet must not reuse it
            self._handles.append(source[0].register_forward_hook(self._forget_sigma))
        for index, (block, norm) in enumerate(zip(self.layout.consumers, self.layout.norms)):
            self._handles.append(block.register_forward_pre_hook(self._input_hook(index), with_kwargs=True))
            if norm is not None:
                self._handles.append(norm.register_forward_hook(self._normalized_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sigma, self._factors = None, self._static

    @contextlib.contextmanager
    def attached(self) -> Iterator["SkipController"]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()


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
