"""Placements against GroupNorm, σ-dependent schedules per sample, and a diffusers DDIM loop."""

import math

import pytest
import torch

from skiptune_search import RhoSchedule, SkipController, apply
from skiptune_search.models.denoisers import EDMPrecond, timestep_to_sigma_from_scheduler
from skiptune_search.core.schedule import PLACEMENTS, ScheduleError

# tiny_unet: skips 0 and 3 meet GroupNorm groups of skip channels only; skips 1 and 2 share a group
PURE, MIXED = 0, 1


def _one_skip(ctl, index, rho, placement):
    rhos = [1.0] * len(ctl.skips)
    rhos[index] = rho
    return RhoSchedule.constant(ctl.arch, ctl.skips, rhos, placement=placement)


def _norm_and_output(unet, ctl, index, schedule=None):
    """The consuming block's GroupNorm output (after the controller) and the UNet output."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.2, -0.3])
    seen = []
    norm = unet.get_submodule(ctl.skips[index].consumer).norm1
    with ctl.attached():
        if schedule is not None:
            ctl.use(schedule)
        handle = norm.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        out = unet(x, t).sample
        handle.remove()
    return seen[0], out


def test_groupnorm_report(tiny_unet):
    report = SkipController(tiny_unet).groupnorm_report()
    assert [r["cancelled"] for r in report] == [True, False, False, True]
    assert all(r["shortcut"] for r in report)


@torch.no_grad()
def test_input_placement_is_cancelled_by_pure_groups_but_acts_through_the_shortcut(tiny_unet):
    ctl = SkipController(tiny_unet)
    c = ctl.skips[PURE].channels
    base_norm, base_out = _norm_and_output(tiny_unet, ctl, PURE)
    norm, out = _norm_and_output(tiny_unet, ctl, PURE, _one_skip(ctl, PURE, 0.5, "input"))
    # the main branch sees the same normalized input (up to GroupNorm's eps) ...
    assert torch.allclose(norm, base_norm, rtol=1e-3, atol=1e-4)
    # ... yet the block output changes, through the 1x1 shortcut that sees the raw skip
    assert not torch.allclose(out, base_out, atol=1e-4)
    # normalized placement scales exactly the skip channels after the norm, nothing else
    norm, out = _norm_and_output(tiny_unet, ctl, PURE, _one_skip(ctl, PURE, 0.5, "normalized"))
    assert torch.equal(norm[:, :-c], base_norm[:, :-c])
    assert torch.allclose(norm[:, -c:], 0.5 * base_norm[:, -c:])
    assert not torch.allclose(out, base_out, atol=1e-4)


@torch.no_grad()
def test_input_placement_reaches_the_main_branch_through_mixed_groups(tiny_unet):
    ctl = SkipController(tiny_unet)
    base_norm, _ = _norm_and_output(tiny_unet, ctl, MIXED)
    norm, _ = _norm_and_output(tiny_unet, ctl, MIXED, _one_skip(ctl, MIXED, 0.5, "input"))
    assert not torch.allclose(norm, base_norm, rtol=1e-3, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_is_exact_at_rho_one_and_unhooks(tiny_unet, placement):
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.9])
    hooks = hook_counts(tiny_unet)
    reference = tiny_unet(x, t).sample
    ctl = SkipController(tiny_unet)
    with apply(tiny_unet, RhoSchedule.constant(ctl.arch, ctl.skips, [1.0] * 4, placement=placement)):
        assert torch.equal(tiny_unet(x, t).sample, reference)
    with apply(tiny_unet, RhoSchedule.constant(ctl.arch, ctl.skips, [0.8] * 4, placement=placement)):
        assert not torch.allclose(tiny_unet(x, t).sample, reference)
    assert hooks == hook_counts(tiny_unet)
    assert torch.equal(tiny_unet(x, t).sample, reference)


@torch.no_grad()
def test_sigma_dependent_schedule_is_applied_per_sample(tiny_unet):
    """In an EDM-style wrapper the controller reads σ from each call, one ρ per sample."""
    check_sigma_per_sample(EDMPrecond(tiny_unet), tiny_unet, channels=1, size=16)


def hook_counts(model):
    """Forward and forward-pre hooks per module: what must be the same before and after apply()."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def check_exact_and_unhooks(model, call):
    """With the hooks installed, ρ = 1 leaves ``call()`` bit-exact and ρ 0.7 → 0.95 changes it;
    every hook is gone after."""
    before = hook_counts(model)
    reference = call()
    ctl = SkipController(model)
    with apply(model, RhoSchedule.identity(ctl.arch, ctl.skips)):
        assert hook_counts(model) != before
        assert torch.equal(call(), reference)
    with apply(model, RhoSchedule.linear(ctl.arch, ctl.skips, 0.7, 0.95)):
        assert not torch.allclose(call(), reference)
    assert hook_counts(model) == before
    assert torch.equal(call(), reference)


def check_sigma_per_sample(precond, unet, channels, size):
    """A per_noise schedule with ρ 0.5 at σ = 0.1 and 1.5 at σ = 10 scales the deepest skip of
    samples at σ = 0.01, 1 and 50 by 0.5 (clamped), 1 (log-midpoint) and 1.5 (clamped)."""
    ctl = SkipController(precond)
    params = {"rho_inner_k0": 0.5, "rho_outer_k0": 0.5, "rho_inner_k1": 1.5, "rho_outer_k1": 1.5}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    sigma = torch.tensor([0.01, 1.0, 50.0])
    expected = torch.tensor([0.5, 1.0, 1.5]).reshape(-1, 1, 1, 1)
    x = torch.randn(3, channels, size, size)
    deepest = ctl.skips[-1]  # consumed first, so the rest of its block's input is untouched
    consumer = unet.get_submodule(deepest.consumer)
    plain, tuned = [], []
    handle = consumer.register_forward_pre_hook(lambda m, a: plain.append(a[0]))
    precond(x, sigma)
    handle.remove()
    with apply(precond, schedule):
        handle = consumer.register_forward_pre_hook(lambda m, a: tuned.append(a[0]))
        precond(x, sigma)
        handle.remove()
    c = deepest.channels
    assert torch.equal(tuned[0][:, :-c], plain[0][:, :-c])
    assert torch.allclose(tuned[0][:, -c:], plain[0][:, -c:] * expected, rtol=1e-6)


def test_sigma_dependent_schedule_needs_a_timestep_map(tiny_unet):
    ctl = SkipController(tiny_unet)
    params = {f"{e}_k{k}": 1.0 for k in range(2) for e in ("rho_inner", "rho_outer")}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    with pytest.raises(ScheduleError, match="timestep_to_sigma"):
        ctl.use(schedule)


@torch.no_grad()
def test_per_noise_schedule_in_a_diffusers_ddim_loop(tiny_unet):
    """Each DDIM step uses the ρ of its own σ = sqrt((1 - ᾱ_t) / ᾱ_t)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DDIMPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    to_sigma = timestep_to_sigma_from_scheduler(scheduler)
    ctl = SkipController(pipe)
    params = {"rho_inner_k0": 0.6, "rho_outer_k0": 0.9, "rho_inner_k1": 1.2, "rho_outer_k1": 1.0,
              "rho_inner_k2": 0.8, "rho_outer_k2": 1.1}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.05, 1.0, 20.0])

    used = []
    with apply(pipe, schedule, timestep_to_sigma=to_sigma) as active:
        def probe(module, args, kwargs):
            used.append((float(active._sigma[0]), [float(active._rho(i).flatten()[0]) for i in range(4)]))
        handle = tiny_unet.up_blocks[0].register_forward_pre_hook(probe, with_kwargs=True)
        pipe(batch_size=1, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
        handle.remove()
    assert len(used) == 5
    timesteps = pipe.scheduler.timesteps  # the pipeline keeps its own copy of the scheduler
    for (sigma, rhos), t in zip(used, timesteps):
        abar = float(scheduler.alphas_cumprod[int(t)])
        assert sigma == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-6)
        assert rhos == pytest.approx(schedule.rhos_at(sigma), rel=1e-6)
    assert len({tuple(r) for _, r in used}) == 5  # a different ρ at every step


@pytest.mark.parametrize("placement", ["input", "normalized"])
def test_in_place_scaling_matches_the_autograd_path(tiny_unet, placement):
    """Without autograd the skip channels are scaled in place; with it, a copy that keeps the
    graph: both give the same samples, and gradients still flow through ρ's tensors."""
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([0.1, 0.9])
    ctl = SkipController(tiny_unet)
    schedule = RhoSchedule.constant(ctl.arch, ctl.skips, [0.6, 0.7, 0.8, 0.9], placement=placement)
    with apply(tiny_unet, schedule):
        with torch.inference_mode():
            in_place = tiny_unet(x, t).sample
        leaf = x.clone().requires_grad_(True)
        copied = tiny_unet(leaf, t).sample
        copied.square().sum().backward()
    assert torch.allclose(in_place, copied.detach(), rtol=1e-5, atol=1e-6)
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(tiny_unet(x, t).sample, in_place, atol=1e-4)
