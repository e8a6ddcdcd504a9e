"""FreeU through the controller: the same output as diffusers' own FreeU, b = s = 1 bit-exact, the
right channels on every adapter, the σ window per sample, the schedule file (version 2 beside 1),
and one-line errors for bad input."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter

from edm_standins import EDMPrecond as EDMStandinPrecond
from edm_standins import SongUNet
from skiptune_search import RhoSchedule, SkipController, SkiptuneError, apply, load_schedule
from skiptune_search.core import freeu
from skiptune_search.core.errors import ScheduleError
from skiptune_search.core.schedule import FORMAT, FORMAT_FREEU, SkipInfo
from skiptune_search.models.denoisers import EDMPrecond

FACTORS = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # SD1.5's preset
ROOT = Path(__file__).parent.parent


def cond_unet():
    """A UNet2DConditionModel with three levels: FreeU's two stages (4 and 8 px) and one it leaves alone."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def freeu_schedule(ctl, family="freeu", window=None, **params):
    return RhoSchedule.from_family(family, ctl.arch, ctl.skips, {**FACTORS, **params}, sigma_window=window)


@torch.no_grad()
def test_same_output_as_diffusers_enable_freeu():
    unet = cond_unet()
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 3, 16)
    plain = unet(x, t, text).sample
    unet.enable_freeu(**FACTORS)
    reference = unet(x, t, text).sample
    unet.disable_freeu()
    ctl = SkipController(unet)
    with apply(unet, freeu_schedule(ctl)):
        ours = unet(x, t, text).sample
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert (reference - plain).abs().max() > 1e-2  # FreeU changed something to compare
    assert torch.equal(unet(x, t, text).sample, plain)  # and left nothing behind


@torch.no_grad()
def test_same_output_as_diffusers_freeu_code_on_a_unet2dmodel():
    """diffusers has no enable_freeu on UNet2DModel, but its UpBlock2D runs FreeU when its
    resolution_idx and factors are set (what enable_freeu sets on a UNet2DConditionModel's blocks)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.2, -0.4])
    ctl = SkipController(unet)
    with apply(unet, freeu_schedule(ctl)):
        ours = unet(x, t).sample
    for i, block in enumerate(unet.up_blocks):
        block.resolution_idx = i
        for name, value in FACTORS.items():
            setattr(block, name, value)
    torch.testing.assert_close(ours, unet(x, t).sample, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_factors_of_one_are_bit_exact(tiny_unet):
    precond = EDMPrecond(tiny_unet)
    x, sigma = torch.randn(3, 1, 16, 16), torch.tensor([0.05, 1.0, 30.0])
    plain = precond(x, sigma)
    ctl = SkipController(precond)
    ones = dict(b1=1.0, b2=1.0, s1=1.0, s2=1.0)
    for window in (None, (0.5, 5.0)):
        with apply(precond, freeu_schedule(ctl, window=window, **ones)):
            assert torch.equal(precond(x, sigma), plain)
    # linear_freeu with FreeU at 1 is linear, bit for bit
    ramp = dict(rho_inner=0.7, rho_outer=1.1)
    with apply(precond, RhoSchedule.from_family("linear", ctl.arch, ctl.skips, ramp)):
        linear = precond(x, sigma)
    with apply(precond, freeu_schedule(ctl, "linear_freeu", **ones, **ramp)):
        assert torch.equal(precond(x, sigma), linear)
    assert not torch.equal(linear, plain)
    unet = cond_unet()
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 3, 16)
    plain = unet(x, t, text).sample
    with apply(unet, freeu_schedule(SkipController(unet), **ones)):
        assert torch.equal(unet(x, t, text).sample, plain)


def _first_consumer_input(precond, net, skip, x, sigma, schedule=None):
    """The input of the first decoder block that takes a skip, as that block sees it."""
    seen = []
    consumer = net.get_submodule(skip.consumer)
    context = apply(precond, schedule) if schedule is not None else SkipController(precond).attached()
    with context:
        handle = consumer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].clone()), with_kwargs=True)
        precond(x, sigma)
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_edm_lowest_stage_gets_b1_on_half_the_backbone_and_s1_on_the_skip_only_inside_the_window():
    """On an EDM SongUNet in its Precond (σ from its sigma argument), per sample; the window's ends
    belong to it."""
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, model_channels=16, channel_mult=(2, 2, 2), num_blocks=2,
                   attn_resolutions=(8,)).eval()
    precond = EDMStandinPrecond(net)
    ctl = SkipController(precond)
    assert freeu.stages(ctl.skips)[-1] == 0 and freeu.stages(ctl.skips)[0] is None
    deepest = ctl.skips[-1]  # consumed first: nothing before it has changed
    x, sigma = torch.randn(4, 3, 16, 16), torch.tensor([0.05, 1.0, 5.0, 50.0])
    plain = _first_consumer_input(precond, net, deepest, x, sigma)
    tuned = _first_consumer_input(precond, net, deepest, x, sigma, freeu_schedule(ctl, window=(0.5, 5.0)))
    c = deepest.channels
    half = (plain.shape[1] - c) // 2
    inside = torch.tensor([False, True, True, False])
    assert torch.equal(tuned[~inside], plain[~inside])  # outside the window: untouched, bit for bit
    assert torch.allclose(tuned[inside, :half], FACTORS["b1"] * plain[inside, :half])
    assert torch.equal(tuned[inside, half:-c], plain[inside, half:-c])
    torch.testing.assert_close(tuned[inside, -c:], fourier_filter(plain[inside, -c:], threshold=1, scale=FACTORS["s1"]))
    assert not torch.allclose(tuned[inside, -c:], plain[inside, -c:])


@torch.no_grad()
def test_a_window_end_read_back_through_c_noise_still_counts(tiny_unet):
    """σ = 5 read back from c_noise = ln(σ)/4 in float32 is 5.00000015: the window's tolerance
    keeps it inside [0.5, 5]; σ = 30 stays outside."""
    precond = EDMPrecond(tiny_unet)
    ctl = SkipController(precond)
    deepest = ctl.skips[-1]
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 30.0])
    assert float(precond.sigma_from_timestep((sigma.log() / 4)[:1].double())) > 5.0  # as the controller reads it
    plain = _first_consumer_input(precond, tiny_unet, deepest, x, sigma)
    tuned = _first_consumer_input(precond, tiny_unet, deepest, x, sigma, freeu_schedule(ctl, window=(0.5, 5.0)))
    assert not torch.allclose(tuned[0], plain[0]) and torch.equal(tuned[1], plain[1])


@torch.no_grad()
def test_freeu_acts_on_the_block_input_whatever_the_placement(tiny_unet):
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.9])
    plain = tiny_unet(x, t).sample
    ctl = SkipController(tiny_unet)
    outputs = []
    for placement in ("input", "normalized", "both"):
        schedule = RhoSchedule.from_family("freeu", ctl.arch, ctl.skips, FACTORS, placement=placement)
        with apply(tiny_unet, schedule):
            outputs.append(tiny_unet(x, t).sample)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], plain, atol=1e-4)


def test_autograd_path_matches_the_in_place_one(tiny_unet):
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([0.1, 0.9])
    ctl = SkipController(tiny_unet)
    with apply(tiny_unet, freeu_schedule(ctl, "linear_freeu", rho_inner=0.8, rho_outer=1.0)):
        with torch.inference_mode():
            in_place = tiny_unet(x, t).sample
        leaf = x.clone().requires_grad_(True)
        copied = tiny_unet(leaf, t).sample
        copied.square().sum().backward()
    torch.testing.assert_close(in_place, copied.detach(), rtol=1e-5, atol=1e-6)
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_a_window_needs_sigma_and_fewer_than_two_stages_is_refused(tiny_unet):
    from diffusers import UNet2DModel

    ctl = SkipController(tiny_unet)
    with pytest.raises(ScheduleError, match="timestep_to_sigma"):
        ctl.use(freeu_schedule(ctl, window=(0.5, 5.0)))
    ctl.use(freeu_schedule(ctl))  # no window: no σ needed
    flat = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    flat_ctl = SkipController(flat)
    with pytest.raises(ScheduleError, match="two decoder stages"):
        freeu_schedule(flat_ctl)


# --- the schedule file -----------------------------------------------------------------------
SKIPS = [SkipInfo(f"s{i}", f"c{i}", 8, 32 >> i) for i in range(4)]


def test_version_2_round_trip(tmp_path):
    s = RhoSchedule.from_family("linear_freeu", "UNet2DModel", SKIPS,
                                {"rho_inner": 0.9, "rho_outer": 1.0, **FACTORS}, sigma_window=(0.3, 12.0))
    data = json.loads(s.save(tmp_path / "f.json").read_text())
    assert data["format"] == FORMAT_FREEU == "skiptune-schedule/2"
    assert data["freeu"] == {**FACTORS, "sigma_window": [0.3, 12.0]}
    again = load_schedule(tmp_path / "f.json")
    assert again.freeu == s.freeu and again.rho == s.rho and again.depends_on_sigma and again.is_constant
    plain = RhoSchedule.linear("UNet2DModel", SKIPS, 0.9, 1.0)
    assert json.loads(plain.save(tmp_path / "r.json").read_text())["format"] == FORMAT == "skiptune-schedule/1"
    assert "freeu" not in json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "schedules").glob("*.json")), ids=lambda p: p.name)
@torch.no_grad()
def test_committed_version_1_files_load_and_apply_unchanged(path):
    from skiptune_search.models.loaders import load_denoiser

    data = json.loads(path.read_text())
    assert data["format"] == "skiptune-schedule/1"
    schedule = load_schedule(path)
    assert schedule.freeu is None and schedule.to_json()["format"] == "skiptune-schedule/1"
    denoiser, _ = load_denoiser(data["tuned_for"]["model"])
    x, sigma = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 4.0])
    table = RhoSchedule(arch=data["arch"], skips=schedule.skips, rho=data["rho"], sigma_knots=data["sigma_knots"],
                        placement=data["placement"])
    with apply(denoiser, table):
        expected = denoiser(x, sigma)
    with apply(denoiser, path):
        assert torch.equal(denoiser(x, sigma), expected)
    assert not torch.equal(denoiser(x, sigma), expected)  # its ρ does act


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["freeu"].update(b1=2.5), r"b1 = 2.5 is outside \[0.8, 1.8\]"),
    (lambda d: d["freeu"].update(s2=-0.1), r"s2 = -0.1 is outside \[0, 1.2\]"),
    (lambda d: d["freeu"].update(sigma_window=[5.0, 1.0]), "need σ_lo < σ_hi"),
    (lambda d: d["freeu"].update(sigma_window=[2.0, 2.0]), "need σ_lo < σ_hi"),
    (lambda d: d["freeu"].update(sigma_window=[0.0, 2.0]), "positive"),
    (lambda d: d["freeu"].update(sigma_window=[1.0]), "sigma_window"),
    (lambda d: d["freeu"].pop("s2"), "'s2' is a required property"),
    (lambda d: d.update(format="skiptune-schedule/1"), "FreeU factors need format 'skiptune-schedule/2'"),
    (lambda d: d.update(format="skiptune-schedule/3"), "export it again"),
])
def test_bad_freeu_files_are_one_line_errors(tmp_path, edit, message):
    data = RhoSchedule.from_family("freeu", "UNet2DModel", SKIPS, FACTORS, sigma_window=(0.5, 5.0)).to_json()
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(SkiptuneError, match=message) as caught:
        load_schedule(tmp_path / "bad.json")
    assert isinstance(caught.value, ScheduleError) and "\n" not in str(caught.value) and "--" not in str(caught.value)


def test_a_freeu_file_for_a_one_level_layout_is_refused(tmp_path):
    data = RhoSchedule.from_family("freeu", "UNet2DModel", SKIPS, FACTORS).to_json()
    one_level = [SkipInfo(f"s{i}", f"c{i}", 8, 16) for i in range(4)]
    data["skips"] = [s.as_dict() for s in one_level]
    data["fingerprint"] = RhoSchedule.identity("UNet2DModel", one_level).fingerprint
    (tmp_path / "flat.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="two decoder stages"):
        load_schedule(tmp_path / "flat.json")


def test_enable_freeu_call_only_where_diffusers_does_the_same():
    make = lambda arch, window=None, **kw: RhoSchedule.from_family(  # noqa: E731
        "freeu", arch, SKIPS, {**FACTORS, **kw}, sigma_window=window)
    assert make("UNet2DConditionModel").enable_freeu_call() == "pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)"
    assert make("UNet2DConditionModel", window=(1.0, 2.0)).enable_freeu_call() is None  # σ-dependent
    assert make("UNet2DModel").enable_freeu_call() is None  # no enable_freeu there
    assert make("UNet2DConditionModel", s2=0.0).enable_freeu_call() is None  # diffusers reads 0 as off
