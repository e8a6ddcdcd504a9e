"""FreeU as Forge and sd-webui-freeu compute it (v2, keyed by channel count), and the presets
`export --format forge|a1111-freeu` writes only where those UIs compute the tuned function.

The reference functions below are written here from reading the UIs' code (Forge:
extensions-builtin/sd_forge_freeu/scripts/forge_freeu.py, patch_freeu_v2 and
FreeUForForge.denoiser_callback; sd-webui-freeu: lib_free_u/unet.py, free_u_cat_hijack,
get_backbone_scale, ratio_to_region, get_schedule_ratio), so the tool's code is checked against
them, not against itself."""

import json
import math

import optuna
import pytest
import torch

from cli_helpers import one_line_error
from skiptune_search import RhoSchedule, SkipController, apply
from skiptune_search.core import freeu
from skiptune_search.core.schedule import SkipInfo
from skiptune_search.sampling.samplers import SAMPLERS, karras_sigmas, steps_for_nfe
from skiptune_search.search import ui_presets

FACTORS = dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)


def forge_v2(h, hsp, b, s):
    """Forge's output_block_patch body for one block whose backbone channels map to (b, s)."""
    hidden_mean = h.mean(1).unsqueeze(1)
    B = hidden_mean.shape[0]
    hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
    h = h.clone()
    h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((b - 1) * hidden_mean + 1)
    freq = torch.fft.fftshift(torch.fft.fftn(hsp.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(freq.shape)
    crow, ccol = freq.shape[-2] // 2, freq.shape[-1] // 2
    mask[..., crow - 1:crow + 1, ccol - 1:ccol + 1] = s
    hsp = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real.to(hsp.dtype)
    return h, hsp


def test_v2_factor_is_forges_formula_and_leaves_samples_outside_the_window_untouched():
    torch.manual_seed(0)
    hidden, skip = torch.randn(3, 8, 4, 4), torch.randn(3, 6, 4, 4)
    want_h, want_s = forge_v2(hidden, skip, 1.3, 0.4)
    h, s = hidden.clone(), skip.clone()
    freeu.apply_(h, s, 1.3, 0.4, version=2)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(h[:, :4], hidden[:, :4]) and torch.equal(h[:, 4:], hidden[:, 4:])
    h, s = hidden.clone(), skip.clone()
    active = torch.tensor([True, False, True])
    freeu.apply_(h, s, 1.3, 0.4, active=active, version=2)
    assert torch.equal(h[1], hidden[1]) and torch.equal(s[1], skip[1])
    assert torch.equal(h[active], want_h[active])


def sd_like_unet():
    """SD 1.x's shape at a tiny size: block_out_channels (c, 2c, 4c, 4c), so two stages have 4c
    channels, and the first block of the third stage takes a 4c backbone."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


@torch.no_grad()
def test_v2_channels_equals_forges_patch_on_every_block_it_keys():
    """Forge's patch as its UNet calls it (h and hsp before the cat of every output block, keyed by
    h's channels: 4c -> b1/s1, 2c -> b2/s2), emulated with pre-hooks on diffusers' up-block
    resnets, against apply() of a v2-channels schedule."""
    unet = sd_like_unet()
    ctl = SkipController(unet)
    keyed = freeu.channel_stages(ctl.skips, ctl.hidden_channels())
    # deepest first: up_blocks.0 and .1 (4c backbone) and up_blocks.2.resnets.0 (4c) get b1; then 2c
    by_consumer = {s.consumer: k for s, k in zip(ctl.skips, keyed)}
    assert by_consumer["up_blocks.1.resnets.0"] == 0 and by_consumer["up_blocks.2.resnets.0"] == 0
    assert by_consumer["up_blocks.2.resnets.1"] == 1 and by_consumer["up_blocks.3.resnets.0"] == 1
    assert by_consumer["up_blocks.3.resnets.1"] is None
    assert freeu.stages(ctl.skips)[[s.consumer for s in ctl.skips].index("up_blocks.2.resnets.0")] is None

    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 3, 16)
    plain = unet(x, t, text).sample
    scale = {32: (FACTORS["b1"], FACTORS["s1"]), 16: (FACTORS["b2"], FACTORS["s2"])}
    handles = []
    for skip in ctl.skips:
        block = unet.get_submodule(skip.consumer)

        def hook(module, args, c=skip.channels):
            h, hsp = args[0][:, :-c], args[0][:, -c:]
            if h.shape[1] in scale:
                h, hsp = forge_v2(h, hsp, *scale[h.shape[1]])
            return (torch.cat([h, hsp], 1), *args[1:])

        handles.append(block.register_forward_pre_hook(hook))
    forge = unet(x, t, text).sample
    for handle in handles:
        handle.remove()
    schedule = RhoSchedule.from_family("freeu", ctl.arch, ctl.skips, FACTORS, freeu_variant="v2-channels")
    with apply(unet, schedule):
        ours = unet(x, t, text).sample
    torch.testing.assert_close(ours, forge, rtol=1e-5, atol=1e-5)
    assert (forge - plain).abs().max() > 1e-2
    stage_keyed = RhoSchedule.from_family("freeu", ctl.arch, ctl.skips, FACTORS)  # diffusers' keying differs
    with apply(unet, stage_keyed):
        assert (unet(x, t, text).sample - forge).abs().max() > 1e-3


def test_channel_keying_on_a_model_without_such_blocks_is_one_line():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 12), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    ctl = SkipController(unet)
    schedule = RhoSchedule.from_family("freeu", ctl.arch, ctl.skips, FACTORS, freeu_variant="v1-channels")
    with pytest.raises(freeu.ScheduleError, match="keyed by channel count acts where a block's backbone has"):
        ctl.use(schedule)


def test_a_variant_round_trips_through_the_file_and_a_default_one_writes_no_new_keys(tmp_path):
    skips = [SkipInfo("a", "x", 4, 16), SkipInfo("b", "y", 8, 8)]
    v2 = RhoSchedule.from_family("freeu", "UNet2DModel", skips, FACTORS, freeu_variant="v2-channels")
    assert v2.to_json()["freeu"]["version"] == 2 and v2.to_json()["freeu"]["keyed_by"] == "channels"
    from skiptune_search import load_schedule

    v2.save(tmp_path / "v2.json")
    assert load_schedule(tmp_path / "v2.json").freeu == v2.freeu
    v1 = RhoSchedule.from_family("freeu", "UNet2DModel", skips, FACTORS)
    assert set(v1.to_json()["freeu"]) == {"b1", "b2", "s1", "s2", "sigma_window"}
    data = v2.to_json()
    data["freeu"]["version"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(freeu.ScheduleError, match="version"):
        load_schedule(tmp_path / "bad.json")


# --- σ of each model call, and the UIs' step counters --------------------------------------------
@pytest.mark.parametrize("sampler, nfe", [("heun", 9), ("euler", 6), ("dpmpp_2m", 5)])
def test_model_calls_are_the_samplers_own(sampler, nfe):
    steps = steps_for_nfe(sampler, nfe)
    sigmas = karras_sigmas(steps, 0.03, 14.6)
    seen = []

    def denoiser(x, sigma):
        seen.append(float(sigma))
        return x * 0.5

    SAMPLERS[sampler][0](denoiser, torch.ones(1, 1, 2, 2, dtype=torch.float64), sigmas)
    calls = ui_presets.model_calls(sampler, sigmas.tolist())
    assert [c.sigma for c in calls] == seen and len(calls) == nfe
    # Forge's counter: k-diffusion's callback sets step i after the first call of step i
    if sampler == "heun":
        assert [c.forge_step for c in calls] == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    else:
        assert [c.forge_step for c in calls] == [0] + list(range(nfe - 1))


def forge_acts(start, end, k, steps):
    """FreeUForForge.denoiser_callback."""
    this_step = k / (steps - 1)
    return this_step >= start and this_step <= end


def a1111_acts(start_ratio, stop_ratio, call, steps):
    """get_schedule_ratio with transition_smoothness 0, to_denoising_step of a float."""
    start_step, stop_step = int(start_ratio * steps), int(stop_ratio * steps)
    return start_step != stop_step and start_step <= call < stop_step


SD_SKIPS = [SkipInfo(n, "", c, r) for n, c, r in [
    ("conv_in", 320, 64), ("down_blocks.0.resnets.0", 320, 64), ("down_blocks.0.resnets.1", 320, 64),
    ("down_blocks.0.downsamplers.0", 320, 32), ("down_blocks.1.resnets.0", 640, 32),
    ("down_blocks.1.resnets.1", 640, 32), ("down_blocks.1.downsamplers.0", 640, 16),
    ("down_blocks.2.resnets.0", 1280, 16), ("down_blocks.2.resnets.1", 1280, 16),
    ("down_blocks.2.downsamplers.0", 1280, 8), ("down_blocks.3.resnets.0", 1280, 8),
    ("down_blocks.3.resnets.1", 1280, 8)]]
SIGMA_RANGE = (0.0292, 14.6146)  # SD's σ_min, σ_max on the Karras grid


def sd_schedule(variant="v2-channels", window=None, sampler="euler", nfe=10, family="freeu", **params):
    return RhoSchedule.from_family(family, "UNet2DConditionModel", SD_SKIPS, {**FACTORS, **params},
                                   sigma_window=window, freeu_variant=variant,
                                   tuned_for={"sampler": sampler, "nfe": nfe, "sigma_grid": "karras"})


@pytest.mark.parametrize("sampler, nfe, window", [("euler", 10, (0.5, 5.0)), ("dpmpp_2m", 12, (1.0, 20.0)),
                                                  ("heun", 9, (0.3, 3.0)), ("euler", 20, (0.01, 2.0))])
def test_forge_start_end_switch_freeu_at_exactly_the_calls_inside_the_window(sampler, nfe, window):
    schedule = sd_schedule(window=window, sampler=sampler, nfe=nfe)
    text, lines = ui_presets.forge_preset(schedule, SIGMA_RANGE)
    values = dict(item.split(": ") for item in text.strip().split(", "))
    start, end, steps = float(values["freeu_start"]), float(values["freeu_end"]), int(values["Steps"])
    assert float(values["freeu_b1"]) == 1.3 and values["freeu_enabled"] == "True"
    assert steps == steps_for_nfe(sampler, nfe) and f"valid for {values['Sampler']} at {steps} steps only" in lines[0]
    sigmas = karras_sigmas(steps, *SIGMA_RANGE).tolist()
    lo, hi = window
    for call in ui_presets.model_calls(sampler, sigmas):
        assert forge_acts(start, end, call.forge_step, steps) == (lo * (1 - 1e-4) <= call.sigma <= hi * (1 + 1e-4))
    assert round(start, 2) == start and round(end, 2) == end  # on the sliders' 0.01 steps


@pytest.mark.parametrize("sampler, nfe, window", [("euler", 10, (0.5, 5.0)), ("dpmpp_2m", 12, (1.0, 20.0)),
                                                  ("heun", 9, (1.0, 20.0)), ("euler", 10, (0.01, 2.0))])
def test_a1111_start_stop_switch_freeu_at_exactly_the_calls_inside_the_window(sampler, nfe, window):
    entry, lines = ui_presets.a1111_preset(sd_schedule("v1-channels", window, sampler, nfe), SIGMA_RANGE)
    steps = steps_for_nfe(sampler, nfe)
    sigmas = karras_sigmas(steps, *SIGMA_RANGE).tolist()
    lo, hi = window
    for call in ui_presets.model_calls(sampler, sigmas):
        inside = lo * (1 - 1e-4) <= call.sigma <= hi * (1 + 1e-4)
        assert a1111_acts(entry["start_ratio"], entry["stop_ratio"], call.index, steps) == inside
    assert entry["version"] == "1" and entry["transition_smoothness"] == 0.0 and entry["stage_infos"][2] == {}


def ratio_to_region(width, offset, n):
    """sd-webui-freeu's ratio_to_region for a width in [0, 1] and offset 0."""
    return round(offset * n), round((width + offset) * n), False


@pytest.mark.parametrize("n", [1280, 640, 320])
def test_a1111_width_masks_exactly_the_first_half_of_the_backbone(n):
    begin, end, inverted = ratio_to_region(ui_presets.a1111_width(n), 0.0, n)
    mask = [begin <= i <= end for i in range(n)]
    assert not inverted and mask == [i < n // 2 for i in range(n)]
    assert sum(begin <= i <= round(0.5 * n) for i in range(n)) == n // 2 + 1  # the default width: one more


def test_no_window_is_start_0_end_1_at_any_step_count():
    text, lines = ui_presets.forge_preset(sd_schedule(), ())
    assert "Steps" not in text and "freeu_start: 0.0, freeu_end: 1.0" in text and "any step count" in lines[0]
    entry, _ = ui_presets.a1111_preset(sd_schedule("v2-channels"), ())
    assert (entry["start_ratio"], entry["stop_ratio"], entry["version"]) == (0.0, 1.0, "2")


def test_rho_is_said_plainly():
    schedule = sd_schedule(family="linear_freeu", rho_inner=0.8, rho_outer=1.0)
    _, lines = ui_presets.forge_preset(schedule, ())
    assert any("cannot apply ρ" in line for line in lines)
    assert not any("ρ" in line for line in ui_presets.forge_preset(sd_schedule(), ())[1])


# --- the command line ------------------------------------------------------------------------
def make_study(tmp_path, variant="v2-channels", window=True, sampler="euler", nfe=10, family="freeu", **params):
    """A study of an SD 1.x skip layout with one completed trial holding ``params``, written
    through the tool's own open_study (no model is sampled)."""
    from types import SimpleNamespace

    from skiptune_search.scoring.task import Task
    from skiptune_search.search.space import Space
    from skiptune_search.search.storage import make_storage
    from skiptune_search.search.study import open_study

    space = Space(family, "input", (0.5, 1.5), (), None, SIGMA_RANGE, "SD1.x", window, freeu_variant=variant)
    ctl = SimpleNamespace(arch="UNet2DConditionModel", skips=SD_SKIPS, unet=torch.nn.Linear(1, 1))
    task = Task(model="sd15", sampler=sampler, nfe=nfe, n=8, sigma_grid="karras" if sampler in SAMPLERS else "model")
    url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    (tmp_path / "studies").mkdir(exist_ok=True)
    study = open_study(make_storage(url), "sd", task, space, ctl, 0)
    ranges = space.ranges(SD_SKIPS)
    values = {**FACTORS, "sigma_lo": 0.5, "sigma_hi": 5.0, "rho_inner": 0.8, "rho_outer": 1.0, **params}
    study.add_trial(optuna.trial.create_trial(
        params={k: values[k] for k in ranges}, value=10.0,
        distributions={k: optuna.distributions.FloatDistribution(lo, hi, log=log) for k, (lo, hi, log) in ranges.items()}))
    return url


def test_export_forge_and_a1111_from_a_study(run, tmp_path):
    make_study(tmp_path)
    result = run("export", "--study", "sd", "--format", "forge", "-o", "forge.txt")
    assert result.exit_code == 0, result.output
    assert "Forge built-in FreeU (v2" in result.output and "valid for Euler at 10 steps only" in result.output
    line = (tmp_path / "forge.txt").read_text()
    assert line.startswith("Steps: 10, Sampler: Euler, Schedule type: Karras, freeu_enabled: True")
    (tmp_path / "presets.json").write_text(json.dumps({"mine": {"version": "1"}}, indent=4))
    result = run("export", "--study", "sd", "--format", "a1111-freeu", "-o", "presets.json", "--name", "tuned")
    assert result.exit_code == 0, result.output
    presets = json.loads((tmp_path / "presets.json").read_text())
    assert presets["mine"] == {"version": "1"} and presets["tuned"]["version"] == "2"
    assert "sd-webui-freeu Version 2" in result.output


def refused(run, tmp_path, needle, fmt="forge", **study):
    make_study(tmp_path, **study)
    result = run("export", "--study", "sd", "--format", fmt, "-o", "out.txt")
    one_line_error(result, "--format:", needle)
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("fmt, study, needle", [
    ("forge", dict(variant="v1-stages"), "keys FreeU by the backbone's channel count"),
    ("a1111-freeu", dict(variant="v1-stages"), "search in FreeU variant v1-channels or v2-channels"),
    ("forge", dict(variant="v1-channels"), "Forge's built-in FreeU is FreeU v2 only"),
    ("forge", dict(family="linear"), "has no FreeU"),
    ("forge", dict(sigma_lo=0.1, sigma_hi=0.105), "holds none of euler's model calls"),
    ("forge", dict(sampler="heun", nfe=9, sigma_lo=4.0, sigma_hi=10.0), "reads one step counter (0)"),
    ("a1111-freeu", dict(sampler="heun", nfe=9, sigma_lo=0.0292, sigma_hi=0.5), "its stop cannot reach the last calls"),
    ("a1111-freeu", dict(sampler="heun", nfe=9, sigma_lo=0.03, sigma_hi=0.5), "needs a stop above 1 (7/5 steps)"),
    ("a1111-freeu", dict(sampler="dpmsolver", nfe=10), "known here only for heun, euler and dpmpp_2m"),
])
def test_export_refusals_are_one_line_and_write_nothing(run, tmp_path, fmt, study, needle):
    refused(run, tmp_path, needle, fmt, **study)


def test_a_file_that_is_not_a_presets_json_is_left_as_it_was(run, tmp_path):
    make_study(tmp_path)
    (tmp_path / "p.json").write_text("[1, 2]\n")
    one_line_error(run("export", "--study", "sd", "--format", "a1111-freeu", "-o", "p.json"), "--out:",
                   "not an sd-webui-freeu presets.json")
    assert (tmp_path / "p.json").read_text() == "[1, 2]\n"


@pytest.mark.parametrize("text, says", [
    ('{"a": {"x": 1}, "a": {"y": 2}}', "key 'a' appears twice"),  # the first 'a' was dropped on the rewrite
    ("[" * 100000 + "]" * 100000, "nested more than"),  # a RecursionError traceback
])
def test_a_presets_json_is_read_strictly(tmp_path, text, says):
    from skiptune_search.core.errors import InputError

    (tmp_path / "p.json").write_text(text)
    with pytest.raises(InputError, match=says) as info:
        ui_presets.presets_json(tmp_path / "p.json", "tuned", {"version": "2"})
    assert info.value.option == "out" and "\n" not in str(info.value)


def test_search_in_a_ui_variant_from_the_command_line(run, tiny_model_dir, tmp_path, monkeypatch):
    """--freeu-variant reaches the study (its name and settings) and the exported file; a ρ family
    refuses it before the model loads; a UNet2DModel's schedule exports no UI preset."""
    import numpy as np

    import skiptune_search.scoring.evaluator as E

    monkeypatch.setattr(E, "fid_from_features", lambda features, reference: float(  # FID's mean term: fast
        ((features.double().mean(0).numpy() - np.asarray(reference.mu, dtype=np.float64)) ** 2).sum()))
    one_line_error(run("search", "--model", tiny_model_dir, "--family", "linear", "--freeu-variant", "v2-channels"),
                   "--freeu-variant: FreeU variant v2-channels needs a FreeU family")
    assert not (tmp_path / "studies").exists()
    result = run("search", "--model", tiny_model_dir, "--family", "freeu", "--freeu-variant", "v2-channels",
                 "--no-window", "--trials", 2, "--n", 8, "--rungs", 8, "--nfe", 3, "--batch", 8)
    assert result.exit_code == 0, result.output
    name = "tiny-model-heun-nfe3-freeu-v2-channels-allsteps-input"
    assert run("export", "--study", name, "-o", "best.json").exit_code == 0
    saved = json.loads((tmp_path / "best.json").read_text())["freeu"]
    assert (saved["version"], saved["keyed_by"]) == (2, "channels")
    one_line_error(run("export", "--study", name, "--format", "forge", "-o", "f.txt"),
                   "--format: Forge samples Stable Diffusion UNets; this schedule is for a UNet2DModel")
    assert not (tmp_path / "f.txt").exists()
