"""FreeU presets for Forge's built-in FreeU and the AUTOMATIC1111 extension sd-webui-freeu, written
only where that UI computes the same function as the tuned schedule (docs/forge-a1111.md).

What each UI computes (read in their code; see the doc for the files and functions):

- Forge (extensions-builtin/sd_forge_freeu/scripts/forge_freeu.py, ``patch_freeu_v2``): FreeU v2
  only, keyed by the backbone's channel count (``model_channels * 4`` -> b1/s1, ``* 2`` ->
  b2/s2): our ``FreeU(version=2, keyed_by="channels")``. It acts at a model call when
  ``start <= k / (steps - 1) <= end``, k being ``state.sampling_step``, which the k-diffusion
  callback sets to i only after the first model call of step i: the first call of step i sees
  i - 1 (step 0 sees 0), Heun's second call of step i sees i.
- sd-webui-freeu (lib_free_u/unet.py): Version 1 or 2, keyed by backbone channels 1280 / 640 /
  320 (stages 1-3); the backbone mask is channels 0..round(width * n) inclusive, so width 0.5
  scales one channel more than half: the preset sets width (n/2 - 1)/n, exactly the first half.
  It acts at model call c (0, 1, ... counted by its on_cfg_after_cfg callback) when
  ``int(start * steps) <= c < int(stop * steps)``.

The σ window becomes those step fractions at the study's sampler and NFE, from the σ at which
that sampler calls the model (``sampling.samplers``): valid for that sampler and step count only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..core.errors import InputError
from ..core.files import check_output_path, read_json
from ..core.schedule import RhoSchedule
from ..sampling import SIGMA_SAMPLERS

FORMATS = ("forge", "a1111-freeu")
# a σ-space sampler of this tool -> the k-diffusion sampler of the same name in Forge and A1111
UI_SAMPLERS = {"heun": "Heun", "euler": "Euler", "dpmpp_2m": "DPM++ 2M"}
SLIDER_STEP = 0.01  # Forge's start/end sliders (step=0.01); sd-webui-freeu's (Gradio's default for [0, 1])
A1111_STAGES = (1280, 640, 320)  # sd-webui-freeu's stages, by backbone channels


@dataclass(frozen=True)
class Call:
    """One model call of a sample: its σ, its index, and the step counter Forge's FreeU reads."""

    sigma: float
    index: int
    forge_step: int


def model_calls(sampler: str, sigmas: list[float]) -> list[Call]:
    """The model calls of σ-space sampler ``sampler`` on the grid ``sigmas`` (ending in 0), in
    order, as ``sampling.samplers`` makes them (and k-diffusion's samplers in Forge and A1111)."""
    calls: list[Call] = []
    steps = len(sigmas) - 1
    for i in range(steps):
        calls.append(Call(sigmas[i], len(calls), max(i - 1, 0)))
        if sampler == "heun" and sigmas[i + 1] > 0:
            calls.append(Call(sigmas[i + 1], len(calls), i))
    return calls


def _refuse(message: str) -> InputError:
    return InputError(message, option="format")


def _check_freeu(schedule: RhoSchedule, ui: str) -> None:
    """The parts of a schedule a UI's FreeU cannot compute: a one-line refusal."""
    f = schedule.freeu
    if f is None:
        raise _refuse(f"the schedule has no FreeU (family {schedule.family}): {ui} applies only FreeU; search a "
                      f"FreeU family (freeu, linear_freeu) in FreeU variant v2-channels")
    if schedule.arch != "UNet2DConditionModel":
        raise _refuse(f"{ui} samples Stable Diffusion UNets; this schedule is for a {schedule.arch}")
    if f.keyed_by != "channels":
        raise _refuse(f"{ui} keys FreeU by the backbone's channel count (on SD 1.x/2.x b1 acts on both 1280-channel "
                      f"stages and the first block after them), this schedule by decoder stage (diffusers' FreeU): "
                      f"search in FreeU variant {'v2-channels' if ui == 'Forge' else 'v1-channels or v2-channels'}")


def _window_calls(schedule: RhoSchedule, sigma_range: tuple[float, ...]) -> tuple[int, list[Call], list[bool]] | None:
    """(steps, model calls, FreeU acting at each) of the study's sampler and NFE; None when FreeU
    has no σ window (it acts at every call, at any step count)."""
    f = schedule.freeu
    if f.window is None:
        return None
    from ..sampling.samplers import karras_sigmas, steps_for_nfe

    tuned = schedule.tuned_for
    sampler, nfe, grid = tuned.get("sampler"), tuned.get("nfe"), tuned.get("sigma_grid")
    if sampler not in SIGMA_SAMPLERS or grid != "karras":
        raise _refuse(f"the σ window's steps are known here only for heun, euler and dpmpp_2m on the karras grid; "
                      f"this study sampled with {sampler} on the {grid} grid: search FreeU at every step (no "
                      f"window) or with one of those samplers")
    if len(sigma_range) != 2:
        raise _refuse("the study does not record its sampler's σ range, so its σ window has no step: search again "
                      "with this version")
    steps = steps_for_nfe(sampler, int(nfe))
    sigmas = karras_sigmas(steps, *sigma_range).tolist()
    calls = model_calls(sampler, sigmas)
    lo, hi = f.bounds()
    acts = [lo <= c.sigma <= hi for c in calls]
    if not any(acts):
        raise _refuse(f"the σ window [{f.window[0]:.4g}, {f.window[1]:.4g}] holds none of {sampler}'s model calls at "
                      f"NFE {nfe}: FreeU never acts, there is nothing to export")
    return steps, calls, acts


def _slider_value(ok, target: float) -> float | None:
    """The multiple of the sliders' 0.01 step in [0, 1] nearest ``target`` for which ``ok(value)``."""
    values = [round(k * SLIDER_STEP, 2) for k in range(int(round(1 / SLIDER_STEP)) + 1)]
    fitting = [v for v in values if ok(v)]
    return min(fitting, key=lambda v: abs(v - target)) if fitting else None


def _rho_note(schedule: RhoSchedule) -> list[str]:
    if all(r == 1.0 for row in schedule.rho for r in row):
        return []
    return [f"note: this schedule also sets ρ ({schedule.family}); these UIs cannot apply ρ, so the preset is its "
            f"FreeU part only and does not reproduce the tuned result: apply the whole schedule with "
            f"skiptune_search.apply"]


def _factors(schedule: RhoSchedule) -> str:
    f = schedule.freeu
    return f"b1={f.b1!r} b2={f.b2!r} s1={f.s1!r} s2={f.s2!r}"


# --- Forge ----------------------------------------------------------------------------------------
def forge_preset(schedule: RhoSchedule, sigma_range: tuple[float, ...] = ()) -> tuple[str, list[str]]:
    """Forge's infotext line for its built-in FreeU ("FreeU Integrated"), and what to tell the
    user. Paste it as the last line under a prompt and press "Read generation parameters"."""
    _check_freeu(schedule, "Forge")
    f = schedule.freeu
    if f.version != 2:
        raise _refuse("Forge's built-in FreeU is FreeU v2 only (patch_freeu_v2: b scaled by the backbone's normalized "
                      "channel mean); this schedule is v1: search in FreeU variant v2-channels, or export for "
                      "sd-webui-freeu, which has v1")
    start, end, steps_line = 0.0, 1.0, ""
    window = _window_calls(schedule, sigma_range)
    if window is not None:
        steps, calls, acts = window
        on = {c.forge_step for c, a in zip(calls, acts) if a}
        off = {c.forge_step for c, a in zip(calls, acts) if not a}
        if on & off:
            k = min(on & off)
            sigmas = [f"{c.sigma:.4g}" for c in calls if c.forge_step == k]
            raise _refuse(f"Forge's FreeU reads one step counter ({k}) at the model calls at σ {', '.join(sigmas)}, "
                          f"and the σ window keeps only some of them: Forge cannot switch FreeU there; search FreeU at "
                          f"every step (no window) or at another NFE")
        if steps < 2:
            raise _refuse("Forge's FreeU divides by (steps - 1): one step has no window; use at least 2 steps")
        ka, kb, last, seen = min(on), max(on), steps - 1, sorted(on | off)
        # as Forge's denoiser_callback tests it: start <= k / (steps - 1) <= end
        start = _slider_value(lambda v: all((v <= k / last) == (k >= ka) for k in seen), ka / last)
        end = _slider_value(lambda v: all((k / last <= v) == (k <= kb) for k in seen), kb / last)
        if start is None or end is None:
            raise _refuse(f"at {steps} steps no start/end on Forge's 0.01 slider steps selects exactly steps "
                          f"{ka}-{kb}: use fewer steps")
        sampler = schedule.tuned_for["sampler"]
        steps_line = f"Steps: {steps}, Sampler: {UI_SAMPLERS[sampler]}, Schedule type: Karras, "
        where = (f"start {start:g}, end {end:g}: Forge's step counter {ka}-{kb} of {steps} {UI_SAMPLERS[sampler]} "
                 f"steps (NFE {schedule.tuned_for['nfe']}), the calls at σ in [{f.window[0]:.4g}, {f.window[1]:.4g}]; "
                 f"valid for {UI_SAMPLERS[sampler]} at {steps} steps only")
    else:
        where = "start 0, end 1: FreeU at every step, at any step count"
    text = (f"{steps_line}freeu_enabled: True, freeu_b1: {f.b1!r}, freeu_b2: {f.b2!r}, freeu_s1: {f.s1!r}, "
            f"freeu_s2: {f.s2!r}, freeu_start: {start!r}, freeu_end: {end!r}\n")
    lines = [f"Forge built-in FreeU (v2, keyed by channels = this schedule's FreeU v2-channels): {_factors(schedule)}; "
             f"{where}",
             "in Forge: put this line under your prompt, press 'Read generation parameters' (the arrow under "
             "Generate), check the FreeU Integrated values"]
    return text, lines + _rho_note(schedule)


# --- sd-webui-freeu -------------------------------------------------------------------------------
def a1111_width(channels: int) -> float:
    """sd-webui-freeu's backbone width that scales exactly the first half of ``channels``: its
    mask is channels 0..round(width * n) inclusive (``ratio_to_region``), so (n/2 - 1)/n."""
    width = (channels // 2 - 1) / channels
    assert round(width * channels) == channels // 2 - 1
    return width


def a1111_preset(schedule: RhoSchedule, sigma_range: tuple[float, ...] = ()) -> tuple[dict, list[str]]:
    """A presets.json entry of sd-webui-freeu (its ``State`` without ``enable``), and what to tell
    the user."""
    _check_freeu(schedule, "sd-webui-freeu")
    f = schedule.freeu
    base = schedule.skips[0].channels
    if base * 4 != A1111_STAGES[0]:
        raise _refuse(f"sd-webui-freeu keys its stages by 1280, 640 and 320 backbone channels (4x, 2x, 1x a base of "
                      f"320); this model's base is {base}")
    start, stop, where = 0.0, 1.0, "start 0, stop 1: FreeU at every model call, at any step count"
    window = _window_calls(schedule, sigma_range)
    if window is not None:
        steps, calls, acts = window
        first = min(c.index for c, a in zip(calls, acts) if a)
        after = max(c.index for c, a in zip(calls, acts) if a) + 1
        sampler = UI_SAMPLERS[schedule.tuned_for["sampler"]]
        if after < len(calls) and after > steps:
            raise _refuse(f"sd-webui-freeu counts model calls against the step count: stopping after call {after} of "
                          f"{len(calls)} needs a stop above 1 ({after}/{steps} steps), beyond its slider; search "
                          f"with euler or dpmpp_2m, or FreeU at every step (no window)")
        if after >= len(calls) and len(calls) > steps:
            raise _refuse(f"sd-webui-freeu counts model calls against the step count: with {sampler} ({len(calls)} "
                          f"calls in {steps} steps) its stop cannot reach the last calls; search with euler or "
                          f"dpmpp_2m, or FreeU at every step (no window)")
        start = _slider_value(lambda v: int(v * steps) == first, (first + 0.5) / steps if first else 0.0)
        stop = 1.0 if after >= len(calls) else _slider_value(lambda v: int(v * steps) == after, (after + 0.5) / steps)
        if start is None or stop is None:
            raise _refuse(f"at {steps} steps no start/stop on the 0.01 slider steps selects exactly model calls "
                          f"{first}-{after - 1}: use fewer steps")
        where = (f"start {start:g}, stop {stop:g}: model calls {first}-{after - 1} of {len(calls)} ({sampler}, {steps} "
                 f"steps, NFE {schedule.tuned_for['nfe']}), the calls at σ in [{f.window[0]:.4g}, {f.window[1]:.4g}]; "
                 f"valid for {sampler} at {steps} steps only, without hires fix")
    stages = [{"backbone_factor": b, "skip_factor": s, "backbone_width": a1111_width(n)}
              for (b, s), n in zip(((f.b1, f.s1), (f.b2, f.s2)), A1111_STAGES)]
    entry = {"start_ratio": start, "stop_ratio": stop, "transition_smoothness": 0.0, "version": str(f.version),
             "stage_infos": [*stages, {}]}
    lines = [f"sd-webui-freeu Version {f.version} (keyed by channels = this schedule's FreeU {f.variant}): "
             f"{_factors(schedule)}, stage 3 off, backbone widths (n/2-1)/n (exactly half the channels); {where}",
             f"in sd-webui-freeu: press 🔄, pick the preset, press ✅, and choose 'Version {f.version}' in the dropdown "
             f"beside Enable (✅ does not set the version)"]
    return entry, lines + _rho_note(schedule)


def presets_json(path: str | os.PathLike, name: str, entry: dict) -> str:
    """The text of sd-webui-freeu's presets.json at ``path`` with ``entry`` under ``name``
    (replacing one of that name), its other presets kept as they were; a new file when there is
    none. Anything else there is a one-line error, and nothing is written."""
    path = check_output_path(path)
    presets: dict = {}
    if path.exists():  # read bounded and strictly (no key twice: the first preset of that name would be lost)
        presets = read_json(path, "sd-webui-freeu presets file", error=InputError, option="out")
        if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
            raise InputError(f"{path} is not an sd-webui-freeu presets.json (a JSON object of presets by name): pass "
                             f"the extension's presets.json or a new file", option="out")
    presets[name] = entry
    return json.dumps(presets, indent=4) + "\n"
