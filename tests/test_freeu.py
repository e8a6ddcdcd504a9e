"""FreeU through the controller: the same output as diffusers' own FreeU, b = s = 1 bit-exact, the
right channels on every adapter, the σ window per sample, the schedule file (version 2 beside 1),
the search's first trials, and one-line errors for bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from click.testing import CliRunner
from diffusers.utils.torch_utils import fourier_filter

from edm_standins import EDMPrecond as EDMStandinPrecond
from edm_standins import SongUNet
from skiptune_search import RhoSchedule, SkipController, SkiptuneError, apply, load_schedule
from skiptune_search.core import freeu
from skiptune_search.core.errors import ScheduleError
from skiptune_search.core.schedule import FORMAT, FORMAT_FREEU, SkipInfo
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.search.space import Space

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
    from skiptune_search.models.source import load_denoiser

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
    (lambda d: d["freeu"].pop("sigma_window"), "'sigma_window' is a required property"),
    (lambda d: d["freeu"].update(window=[0.3, 1.0]), r"unknown key\(s\) 'window'"),
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
    assert str(caught.value).startswith(str(tmp_path / "bad.json"))  # which file


def test_a_version_1_file_with_freeu_null_loads_as_plain_rho(tmp_path):
    data = RhoSchedule.from_family("linear", "UNet2DModel", SKIPS, {"rho_inner": 0.8, "rho_outer": 1.0}).to_json()
    assert data["format"] == "skiptune-schedule/1" and "freeu" not in data
    (tmp_path / "s.json").write_text(json.dumps({**data, "freeu": None}))
    assert load_schedule(tmp_path / "s.json").freeu is None


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
    assert make("UNet2DConditionModel", b1=1.23456789).enable_freeu_call() == \
        "pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.23456789, b2=1.6)"  # the same factors, not rounded


def test_export_lines_say_why_a_pipeline_schedule_has_no_enable_freeu_line():
    from skiptune_search.cli.common import freeu_lines

    windowed = RhoSchedule.from_family("freeu", "UNet2DConditionModel", SKIPS, FACTORS, sigma_window=(1.0, 2.0))
    assert freeu_lines(windowed)[-1] == ("diffusers: no pipe.enable_freeu equivalent (it has a σ window); sample "
                                         "with skiptune_search.apply")
    zero = RhoSchedule.from_family("freeu", "UNet2DConditionModel", SKIPS, {**FACTORS, "s2": 0.0})
    assert "a factor is 0" in freeu_lines(zero)[-1]
    assert len(freeu_lines(RhoSchedule.from_family("freeu", "UNet2DModel", SKIPS, FACTORS, sigma_window=(1.0, 2.0)))) == 1


# --- the search space --------------------------------------------------------------------------
def test_ranges_hold_every_preset_and_the_first_trials_are_untuned_preset_ramp():
    space = Space("linear_freeu", "input", (0.5, 1.5), sigma_range=(0.002, 80.0), freeu_model="SDXL")
    ranges = space.ranges(SKIPS)
    for preset in freeu.PRESETS.values():
        for name, value in zip(freeu.FACTORS, preset):
            assert ranges[name][0] <= value <= ranges[name][1]
    assert ranges["sigma_lo"] == (0.002, 80.0, True) and ranges["rho_inner"] == (0.5, 1.5, False)
    firsts = space.first_trials(SKIPS, "tpe")
    assert [attr for attr, _ in firsts] == ["baseline", "freeu_preset", "paper_ramp"]
    base, preset, ramp = (params for _, params in firsts)
    assert base == {"rho_inner": 1.0, "rho_outer": 1.0, "b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0,
                    "sigma_lo": 0.002, "sigma_hi": 80.0}
    assert preset == {**base, "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    assert ramp == {**base, "rho_inner": 0.8, "rho_outer": 1.0}
    assert space.marks("freeu_preset") == {"freeu_preset": "SDXL", "freeu_preset_note": "SDXL layout: SDXL's preset"}
    assert space.schedule("A", SKIPS, base).is_identity() and not space.schedule("A", SKIPS, base).depends_on_sigma
    grid = space.grid(SKIPS, 11)
    assert all(v in grid[name] for name, v in preset.items())  # a grid search can run the preset too
    unknown = Space("freeu", "input", sigma_range=(0.002, 80.0))
    assert unknown.marks("freeu_preset")["freeu_preset"] == "SD1.5"
    assert "no published FreeU preset" in unknown.marks("freeu_preset")["freeu_preset_note"]


def test_sd_families_are_recognized_from_the_unet_config():
    def fake(**config):
        unet = type("UNet2DConditionModel", (), {})()
        unet.config = SimpleNamespace(**{"in_channels": 4, "addition_embed_type": None, **config})
        return unet

    sd = dict(block_out_channels=(320, 640, 1280, 1280))
    assert freeu.recognize(fake(cross_attention_dim=768, **sd)) == "SD1.x"
    assert freeu.recognize(fake(cross_attention_dim=1024, **sd)) == "SD2.x"
    assert freeu.recognize(fake(cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                addition_embed_type="text_time")) == "SDXL"
    assert freeu.recognize(fake(cross_attention_dim=16, block_out_channels=(8, 16))) is None
    assert freeu.preset_for("SD1.x")[:2] == ("SD1.5", freeu.FreeU(1.5, 1.6, 0.9, 0.2))
    assert "SD1.4 and SD1.5 share" in freeu.preset_for("SD1.x")[2]
    assert freeu.preset_for("SD2.x")[1] == freeu.FreeU(1.4, 1.6, 0.9, 0.2)


def test_trial_windows_in_either_order_whole_range_and_one_sigma():
    space = Space("freeu", "input", sigma_range=(0.002, 80.0))
    assert space.window({"sigma_lo": 5.0, "sigma_hi": 0.5}) == (0.5, 5.0)
    assert space.window({"sigma_lo": 0.002, "sigma_hi": 80.0}) is None  # every step: σ-independent
    lo, hi = space.window({"sigma_lo": 80.0, "sigma_hi": 80.0})  # an optimizer clipped both to a bound
    assert lo < 80.0 < hi and hi / lo < 1.001


def test_a_window_searched_over_the_model_calls_holds_exactly_the_chosen_calls():
    """Heun NFE 9 calls the model at 5 distinct σ: each (first, last) pair of calls, in either
    order, is a window holding those calls and no other; all of them: no window (every σ)."""
    calls = (80.0, 17.5, 2.52, 0.17, 0.002)
    space = Space("freeu", "input", sigma_range=(0.002, 80.0), call_sigmas=calls)
    assert space.params(SKIPS) == [*freeu.FACTORS, "first_call", "last_call"]
    assert space.ranges(SKIPS)["first_call"] == (0, 4, False)
    assert space.baseline(SKIPS) == {**dict.fromkeys(freeu.FACTORS, 1.0), "first_call": 0, "last_call": 4}
    assert space.as_dict()["call_sigmas"] == list(calls)
    for first in range(5):
        for last in range(5):
            window = space.window({"first_call": first, "last_call": last})
            chosen = set(range(min(first, last), max(first, last) + 1))
            if chosen == set(range(5)):
                assert window is None
                continue
            on = freeu.FreeU(window=window).active(torch.tensor(calls, dtype=torch.float64)).tolist()
            assert {i for i, active in enumerate(on) if active} == chosen, (first, last, window)
    assert space.grid(SKIPS, 11)["first_call"] == [0] and space.grid(SKIPS, 11)["last_call"] == [4]
    # without the calls (your own sampling loop) the ends are searched in σ as before
    assert Space("freeu", "input", sigma_range=(0.002, 80.0)).params(SKIPS)[-2:] == list(freeu.WINDOW_PARAMS)


def test_a_proposal_that_scales_every_call_alike_is_not_sampled_again():
    """Two proposals whose windows differ but hold the same model calls, and the baseline's twin:
    each recorded with the first one's scores and state, marked same_as, never scored."""
    from skiptune_search.scoring.evaluator import Rung
    from skiptune_search.search.objective import Objective, calls_key

    calls = (80.0, 17.5, 2.52, 0.17, 0.002)
    space = Space("freeu", "input", sigma_range=(0.002, 80.0), call_sigmas=calls)
    scored = []

    class Scorer:
        def score(self, schedule, progress=False):
            scored.append(schedule)
            for n in (4, 8):
                yield Rung(n=n, fid=100.0 + len(scored) + n, kid=None, images=torch.zeros(1, 1, 4, 4, dtype=torch.uint8))

    objective = Objective(Scorer(), space, "UNet2DModel", SKIPS, (4, 8), call_sigmas=calls)
    study = optuna.create_study()
    factors = {**FACTORS, "first_call": 1, "last_call": 2}
    study.enqueue_trial(space.baseline(SKIPS), user_attrs={"baseline": True})
    study.enqueue_trial(factors)
    study.enqueue_trial({**factors, "first_call": 2, "last_call": 1})  # the same calls, the other order
    study.enqueue_trial({**dict.fromkeys(freeu.FACTORS, 1.0), "first_call": 3, "last_call": 3})  # untuned again
    study.optimize(objective, n_trials=4)
    assert len(scored) == 2
    t = study.trials
    assert "same_as" not in t[0].user_attrs and "same_as" not in t[1].user_attrs
    assert t[2].user_attrs["same_as"] == 1 and t[2].value == t[1].value
    assert t[2].intermediate_values == t[1].intermediate_values and t[2].user_attrs["fid_at"] == t[1].user_attrs["fid_at"]
    assert t[3].user_attrs["same_as"] == 0 and t[3].value == t[0].value
    # a σ-dependent schedule with unknown calls is never taken for another
    windowed = space.schedule("UNet2DModel", SKIPS, factors)
    assert calls_key(windowed, calls) is not None and calls_key(windowed, ()) is None


def test_a_one_level_model_writes_no_study(tmp_path):
    from skiptune_search.search.storage import make_storage
    from skiptune_search.search.study import open_study

    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    flat = [SkipInfo(f"s{i}", f"c{i}", 8, 16) for i in range(3)]
    controller = SimpleNamespace(arch="UNet2DModel", skips=flat, unet=torch.nn.Linear(1, 1))
    with pytest.raises(ScheduleError, match="two decoder stages") as caught:
        open_study(storage, "flat", None, Space("freeu", "input", sigma_range=(0.002, 80.0)), controller, 0)
    assert caught.value.option == "family" and "--" not in str(caught.value)
    assert optuna.get_all_study_summaries(storage) == []


# --- the command line ----------------------------------------------------------------------------
@pytest.fixture
def quick_fid(monkeypatch):
    """FID's mean term only: these tests check what the command line does with FreeU, not FID
    (tested elsewhere), and the full one's matrix square root takes seconds per trial here."""
    import numpy as np

    import skiptune_search.scoring.evaluator as E

    monkeypatch.setattr(E, "fid_from_features", lambda features, reference: float(
        ((features.double().mean(0).numpy() - np.asarray(reference.mu, dtype=np.float64)) ** 2).sum()))


def test_search_linear_freeu_export_and_apply_from_the_command_line(tiny_model_dir, tmp_path, monkeypatch, quick_fid):
    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a], catch_exceptions=False)  # noqa: E731
    assert "[0.8, 1.8]" in run("search", "--help").output and "[0, 1.2]" in run("search", "--help").output
    table = run("inspect", "--model", tiny_model_dir)
    assert table.exit_code == 0 and "FreeU" in table.output and "b1/s1" in table.output
    skips = json.loads(run("inspect", "--model", tiny_model_dir, "--json").output)["skips"]
    assert [s["freeu_stage"] for s in skips] == [2, 2, 1, 1]  # tiny_unet: skips at 16, 16, 8, 8 px
    result = run("search", "--model", tiny_model_dir, "--family", "linear_freeu", "--trials", 3, "--n", 8,
                 "--rungs", 8, "--nfe", 3, "--batch", 8)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "(baseline)" in out and "(FreeU preset: no published FreeU preset for this model: SD1.5's values)" in out
    assert "best FreeU: b1=" in out
    name = "tiny-model-heun-nfe3-linear_freeu-input"
    best = json.loads((tmp_path / "studies" / f"{name}.best.json").read_text())
    assert best["format"] == "skiptune-schedule/2" and set(best["freeu"]) == {*freeu.FACTORS, "sigma_window"}
    study = optuna.load_study(study_name=name, storage="sqlite:///studies/skiptune.db")
    preset = next(t for t in study.trials if t.user_attrs.get("freeu_preset"))
    assert preset.number == 1 and preset.user_attrs["freeu_preset"] == "SD1.5"
    assert preset.user_attrs["freeu"] == {**FACTORS, "sigma_window": None}
    calls = study.user_attrs["settings"]["call_sigmas"]  # heun NFE 3: two distinct σ, the window over them
    assert len(calls) == 2 and all(set(t.params) >= {"first_call", "last_call"} for t in study.trials)
    for t in study.trials:  # no trial's window misses every model call
        window = t.user_attrs["freeu"]["sigma_window"]
        assert window is None or any(freeu.FreeU(window=window).active(torch.tensor(calls)).tolist())
    result = run("export", "--study", name, "-o", "best.json")
    assert result.exit_code == 0 and "FreeU: b1=" in result.output
    assert "enable_freeu" not in result.output  # a UNet2DModel: diffusers has no enable_freeu there
    from skiptune_search.models.source import load_denoiser

    denoiser, _ = load_denoiser(tiny_model_dir)
    with torch.no_grad(), apply(denoiser, "best.json") as ctl:  # the exported file applies
        assert ctl.schedule.freeu == load_schedule(tmp_path / "studies" / f"{name}.best.json").freeu
        assert torch.isfinite(denoiser(torch.randn(2, 1, 16, 16), torch.tensor([0.5, 20.0]))).all()


def test_search_freeu_at_every_sigma_searches_no_window(tiny_model_dir, tmp_path, monkeypatch, quick_fid):
    """--no-window: FreeU acts at every σ (as enable_freeu), the window's ends are not parameters,
    the study is another one than the windowed search's; a ρ family without FreeU refuses it."""
    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a], catch_exceptions=False)  # noqa: E731
    result = run("search", "--model", tiny_model_dir, "--family", "freeu", "--no-window", "--trials", 4, "--n", 8,
                 "--rungs", 8, "--nfe", 3, "--batch", 8)
    assert result.exit_code == 0, result.output
    name = "tiny-model-heun-nfe3-freeu-allsteps-input"
    study = optuna.load_study(study_name=name, storage="sqlite:///studies/skiptune.db")
    assert study.user_attrs["settings"]["freeu_window"] is False
    assert all(set(t.params) == set(freeu.FACTORS) for t in study.trials) and len(study.trials) == 4
    assert all(t.user_attrs["freeu"]["sigma_window"] is None for t in study.trials)
    best = load_schedule(tmp_path / "studies" / f"{name}.best.json")
    assert best.freeu.window is None and not best.depends_on_sigma
    result = run("report", "--study", name, "-o", "r.html", "--samples", 0)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    preset = next(t for t in study.trials if t.user_attrs.get("freeu_preset"))
    assert f"<th>FreeU preset (SD1.5)</th><td>{preset.value:.3f} (trial {preset.number})</td>" in page
    assert f"<th>best FreeU</th><td>b1={best.freeu.b1:.3f}, b2={best.freeu.b2:.3f}" in page and "at every σ" in page
    assert "<h2>FreeU&#x27;s factors</h2>" in page and "<h2>Best schedule</h2>" not in page  # ρ = 1: no heatmap
    result = run("search", "--model", tiny_model_dir, "--family", "linear", "--no-window", "--n", 8, "--nfe", 3)
    assert result.exit_code == 2 and result.output.startswith("Error: --family: FreeU acting at every σ (no window) "
                                                              "needs a FreeU family"), result.output


def test_a_new_search_is_warm_started_from_the_best_at_another_nfe(tiny_model_dir, tmp_path, monkeypatch, quick_fid):
    """The NFE 3 study's best goes first (after the baseline) in a new NFE 5 study, its window moved
    to the NFE 5 sampler's calls inside it; --no-warm-start and a resumed study queue none."""
    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a], catch_exceptions=False)  # noqa: E731
    search = ("search", "--model", tiny_model_dir, "--family", "freeu", "--n", 8, "--rungs", 8, "--batch", 8)
    assert run(*search, "--nfe", 3, "--trials", 2).exit_code == 0
    url = "sqlite:///studies/skiptune.db"
    nfe3 = optuna.load_study(study_name="tiny-model-heun-nfe3-freeu-input", storage=url)
    best_params = {**FACTORS, "first_call": 1, "last_call": 1}  # the lower of NFE 3's two calls
    nfe3.add_trial(optuna.trial.create_trial(params=best_params, distributions=nfe3.trials[0].distributions, value=-1.0))
    window = Space("freeu", sigma_range=(1, 2), call_sigmas=tuple(nfe3.user_attrs["settings"]["call_sigmas"])).window(best_params)
    result = run(*search, "--nfe", 5, "--trials", 3)
    assert result.exit_code == 0, result.output
    assert "warm start: after the baseline, the best of NFE 3 (FID -1, trial 2 of tiny-model-heun-nfe3-freeu-input)" \
        in result.output and "(warm start: the best of NFE 3, trial 2" in result.output
    nfe5 = optuna.load_study(study_name="tiny-model-heun-nfe5-freeu-input", storage=url)
    warm = nfe5.trials[1]
    assert warm.user_attrs["warm_start"]["nfe"] == 3 and nfe5.trials[0].user_attrs["baseline"]
    calls5 = torch.tensor(nfe5.user_attrs["settings"]["call_sigmas"])
    inside = freeu.FreeU(window=window).active(calls5).tolist()  # NFE 5's calls in the NFE 3 best's window
    first, last = warm.params["first_call"], warm.params["last_call"]
    assert [first <= i <= last for i in range(len(calls5))] == inside and any(inside)
    assert {k: warm.params[k] for k in freeu.FACTORS} == FACTORS
    result = run(*search, "--nfe", 5, "--trials", 4)  # resumed: nothing queued again
    assert "warm start" not in result.output and sum("warm_start" in t.user_attrs for t in nfe5.trials) == 1
    result = run(*search, "--nfe", 7, "--trials", 2, "--no-warm-start")
    assert result.exit_code == 0 and "warm start" not in result.output


def test_search_freeu_on_a_one_level_model_is_a_one_line_error(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    from skiptune_search.cli import main
    from skiptune_search.models.loaders import save_model_dir

    torch.manual_seed(0)
    flat = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)).eval()
    save_model_dir(flat, tmp_path / "flat", training={"steps": 0}, dataset="fashion-mnist")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--model", str(tmp_path / "flat"), "--family", "freeu", "--n", "8",
                                       "--nfe", "3"], catch_exceptions=False)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: --family: family freeu: FreeU needs two decoder stages")
    storage = "sqlite:///studies/skiptune.db"
    assert not (tmp_path / "studies" / "skiptune.db").exists() or optuna.get_all_study_summaries(storage) == []


def test_export_prints_diffusers_enable_freeu_for_a_text_model(tiny_sd_dir, prompt_file, tmp_path, monkeypatch,
                                                              quick_fid, bundled_npz):
    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["search", "--model", str(tiny_sd_dir), "--prompts", str(prompt_file), "--guidance",
                                  "3", "--family", "freeu", "--trials", "2", "--n", "4", "--rungs", "4", "--nfe", "3",
                                  "--sampler", "euler_discrete", "--batch", "4", "--reference", bundled_npz])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", "--study", "tiny-sd-euler_discrete-nfe3-cfg3-freeu-input", "-o", "best.json"])
    assert result.exit_code == 0, result.output
    schedule = load_schedule(tmp_path / "best.json")  # the baseline or SD1.5's preset, both at every σ
    assert f"diffusers: {schedule.freeu.enable_freeu_call()}" in result.output
    assert "pipe.enable_freeu(s1=" in result.output
