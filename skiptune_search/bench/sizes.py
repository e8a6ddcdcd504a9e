"""Table 7: the controller on real architectures at their published sizes, with random weights.

No checkpoint is needed to check the hooks: each architecture is built from its public config
(Stable Diffusion 1.5 and SDXL base from their unet/config.json through diffusers; EDM's ADM for
ImageNet-64, EDM2-img64-S and U-ViT-M for ImageNet-64 from the user's checkouts of NVlabs/edm,
NVlabs/edm2 and baofff/U-ViT, imported at run time, never copied here). Per architecture: the
skips found, parameters, seconds per model call at batch 1 and the published resolution, the
time spent inside the controller's hooks per call at ρ = 1 and at a σ-dependent schedule, whether
ρ = 1 is bit-exact and ρ ≠ 1 changes the output, and the peak memory.

Each architecture is measured in a process of its own (``python -m skiptune_search.bench.sizes``),
so that its peak memory is its own and the checkouts' top-level packages (EDM and EDM2 both name
theirs ``training``) never meet.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import InputError
from .tables import Table, register_table

# --- the published configs: diffusers' unet/config.json of SD 1.5 and SDXL base 1.0 -----------------
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# SD's noise schedule (scaled_linear betas 0.00085 to 0.012 over 1000 steps): σ of each timestep
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass
class Built:
    """One architecture ready to call: ``model`` holds the skips; ``call(x)`` is one model call on
    the batch-1 input ``x`` at σ = 1 (the σ-dependent schedule acts there)."""

    model: torch.nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]
    input: str
    source: str
    sigma_range: tuple[float, float]
    timestep_to_sigma: Callable | None = None


# --- builders: random weights (seeded), the published sizes -----------------------------------------
def build_sd(config: dict, name: str, device: torch.device) -> Built:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..models.denoisers import timestep_to_sigma_from_scheduler

    unet = UNet2DConditionModel(**config).eval().requires_grad_(False).to(device)
    to_sigma = timestep_to_sigma_from_scheduler(DDPMScheduler(**SD_BETAS))
    latent, text = config["sample_size"], (77, config["cross_attention_dim"])
    kwargs = {"encoder_hidden_states": torch.randn(1, *text, device=device)}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and micro-conditioning
        size = float(latent * 8)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, device=device),
                                       "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device)}
    sigmas = to_sigma(torch.arange(1000.0))
    t_at_one = float((sigmas - 1).abs().argmin())  # the timestep whose σ is nearest 1

    def call(x):
        return unet(x, torch.tensor([t_at_one], device=device), **kwargs).sample

    return Built(unet, call, (1, 4, latent, latent), f"1x4x{latent}x{latent} latent, 77x{text[1]} text",
                 f"diffusers UNet2DConditionModel, {name} unet/config.json",
                 (float(sigmas[0]), float(sigmas[-1])), to_sigma)


def _on_path(checkout: Path):
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))


def build_edm_adm(checkout: Path, device: torch.device) -> Built:
    _on_path(checkout)
    from training.networks import EDMPrecond  # the checkout's

    # train.py --arch=adm (ImageNet-64, class-conditional)
    net = EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                     model_channels=192, channel_mult=[1, 2, 3, 4]).eval().requires_grad_(False).to(device)
    labels = torch.nn.functional.one_hot(torch.tensor([7]), 1000).float().to(device)
    return Built(net, lambda x: net(x, torch.ones(1, device=device), labels), (1, 3, 64, 64),
                 "1x3x64x64, class label", "NVlabs/edm training/networks.py: EDMPrecond(DhariwalUNet), "
                 "train.py --arch=adm at 64 px", (0.002, 80.0))


def build_edm2(checkout: Path, device: torch.device) -> Built:
    _on_path(checkout)
    from training.networks_edm2 import Precond  # the checkout's

    # train_edm2.py preset edm2-img64-s: 192 channels, the UNet's default multipliers, blocks, attention
    net = Precond(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                  dropout=0.0).eval().requires_grad_(False).to(device)
    labels = torch.nn.functional.one_hot(torch.tensor([7]), 1000).float().to(device)
    return Built(net, lambda x: net(x, torch.ones(1, device=device), labels), (1, 3, 64, 64),
                 "1x3x64x64, class label", "NVlabs/edm2 training/networks_edm2.py: Precond(UNet), preset "
                 "edm2-img64-s", (0.002, 80.0))


def build_uvit(checkout: Path, device: torch.device) -> Built:
    from ..models import uvit as U

    root = U._checkout(checkout)
    config_path = U._config_file(root, Path("imagenet64_uvit_mid.pth"), None)
    config = U._import_file("skiptune_bench_uvit_config", config_path).get_config()
    U._import_file("skiptune_bench_uvit_libs", root / "libs" / "__init__.py", package_dir=root / "libs")
    module = U._import_file("skiptune_bench_uvit_libs.uvit", root / "libs" / "uvit.py")
    kwargs = {k: v for k, v in dict(config.nnet).items() if k != "name"}
    net = module.UViT(**{**kwargs, "use_checkpoint": False}).eval().requires_grad_(False)
    denoiser = U.UViTPrecond(net, label_dim=int(kwargs["num_classes"])).to(device)
    labels = torch.nn.functional.one_hot(torch.tensor([7]), int(kwargs["num_classes"])).float().to(device)
    size = int(kwargs["img_size"])
    return Built(denoiser, lambda x: denoiser(x, torch.ones(1, device=device), labels), (1, 3, size, size),
                 f"1x3x{size}x{size}, class label", "baofff/U-ViT libs/uvit.py: UViT, configs/imagenet64_uvit_mid.py",
                 (denoiser.sigma_min, denoiser.sigma_max))


# name in the table, the checkout it needs (None: diffusers), the builder
ARCHITECTURES: dict[str, tuple[str, str | None, Callable]] = {
    "sd15": ("SD 1.5 UNet", None, lambda ck, dev: build_sd(SD15, "stable-diffusion-v1-5", dev)),
    "sdxl": ("SDXL base UNet", None, lambda ck, dev: build_sd(SDXL, "stable-diffusion-xl-base-1.0", dev)),
    "edm-adm64": ("EDM ADM ImageNet-64", "edm", build_edm_adm),
    "edm2-img64-s": ("EDM2-img64-S", "edm2", build_edm2),
    "uvit-m-in64": ("U-ViT-M ImageNet-64", "uvit", build_uvit),
}
CHECKOUTS = {"edm": "NVlabs/edm", "edm2": "NVlabs/edm2", "uvit": "baofff/U-ViT"}
CHECKOUT_FILES = {"edm": "training/networks.py", "edm2": "training/networks_edm2.py", "uvit": "libs/uvit.py"}


def check_checkouts(checkouts: dict[str, Path]) -> None:
    """A one-line error, before anything is measured, for a folder that is not the checkout named."""
    for name, path in checkouts.items():
        if not (Path(path) / CHECKOUT_FILES[name]).is_file():
            raise InputError(f"{path} is not a checkout of {CHECKOUTS[name]} (no {CHECKOUT_FILES[name]} in it)",
                             option=f"{name}_path")


# --- one architecture, measured in its own process ---------------------------------------------------
def _timed_hooks(ctl, clock: Callable[[], float]) -> list[float]:
    """Wrap each hook the controller installed so the seconds spent inside them add up in the
    returned one-element list (the controller itself is not changed); ``clock`` synchronizes a
    GPU, so its hooks' kernels are counted, not only their launches."""
    spent = [0.0]

    def timed(fn):
        def hook(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += clock() - start
        return hook

    for handle in ctl._handles:
        hooks = handle.hooks_dict_ref()
        hooks[handle.id] = timed(hooks[handle.id])
    return spent


def measure(key: str, checkout: Path | None, calls: int, device: torch.device) -> dict:
    """Build ``key`` with seeded random weights and time ``calls`` model calls each: bare, with
    the controller at ρ = 1, and at a σ-dependent schedule (per_noise, 3 knots, ρ 0.8-1.2)."""
    from .. import RhoSchedule, SkipController
    from ..search.space import log_spaced_knots

    label, _, builder = ARCHITECTURES[key]
    torch.manual_seed(0)
    built = builder(checkout, device)
    with torch.no_grad():  # layers a fresh model starts at zero (output layers, gains) are trained away from it
        for p in built.model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    ctl = SkipController(built.model, timestep_to_sigma=built.timestep_to_sigma)
    torch.manual_seed(1)
    x = torch.randn(built.shape, device=device)
    knots = log_spaced_knots(*built.sigma_range, 3)
    params = {f"{end}_k{k}": 0.8 + 0.2 * k if end == "rho_inner" else 1.2 - 0.1 * k
              for k in range(3) for end in ("rho_inner", "rho_outer")}
    varying = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=knots)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def run(schedule=None) -> tuple[torch.Tensor, list[float], float]:
        """The output of the last call, seconds per call, and hook seconds per call."""
        if schedule is None:
            ctl.detach()
            spent = [0.0]
        else:
            ctl.attach()
            ctl.use(schedule)
            spent = _timed_hooks(ctl, clock)
        seconds = []
        with torch.inference_mode():
            for _ in range(calls):
                start = clock()
                out = built.call(x)
                seconds.append(clock() - start)
        ctl.detach()
        return out.float().cpu(), seconds, spent[0] / calls

    with torch.inference_mode():
        built.call(x)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain, bare, _ = run()
    same, hooked, hooks_rho1 = run(ctl.identity())
    changed, _, hooks_varying = run(varying)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"key": key, "label": label, "source": built.source, "input": built.input, "arch": ctl.arch,
            "skips": len(ctl.skips), "params": sum(p.numel() for p in built.model.parameters()),
            "calls": calls, "bare_s": bare, "hooked_s": hooked, "hooks_rho1_s": hooks_rho1,
            "hooks_varying_s": hooks_varying, "rho1_exact": bool(torch.equal(same, plain)),
            "varying_changes": bool(not torch.equal(changed, plain) and torch.isfinite(changed).all()),
            "peak_bytes": peak, "peak_kind": "CUDA allocated" if device.type == "cuda" else "process RSS",
            "device": str(device)}


def measure_in_child(key: str, checkout: Path | None, calls: int, device: str, threads: int) -> dict:
    """``measure`` in a fresh Python process; its own errors come back as one line."""
    command = [sys.executable, "-P", "-m", "skiptune_search.bench.sizes", key, "--calls", str(calls), "--device", device,
               "--threads", str(threads)] + (["--checkout", str(checkout)] if checkout else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # the child's last line: its error (its traceback stays in the child's stderr)
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"key": key, "label": ARCHITECTURES[key][0], "failed": lines[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_sizes(checkouts: dict[str, Path | None], path: Path, stamp: dict, device: torch.device, calls: int,
              progress: bool = True) -> dict:
    """Measure every architecture whose checkout is given (diffusers' always), each in its own
    process, saving the results after each; architectures without a checkout are listed as such,
    and one whose measurement failed with its error (the others are still measured). The
    checkouts are checked by ``check_checkouts`` before any table runs."""
    from tqdm import tqdm

    from .search import load_results, save_results

    results = load_results(path)
    rows = results.setdefault("rows", {})
    results.update(stamp, calls=calls)
    for key in (bar := tqdm(list(ARCHITECTURES), desc="table 7", disable=not progress)):
        label, needs, _ = ARCHITECTURES[key]
        bar.set_postfix_str(label)
        checkout = checkouts.get(needs) if needs else None
        if needs and checkout is None:
            rows.setdefault(key, {"label": label, "missing": CHECKOUTS[needs]})
            continue
        rows[key] = {**measure_in_child(key, checkout, calls, str(device), torch.get_num_threads()),
                     "machine": stamp["machine"]}
        save_results(path, results)
    save_results(path, results)
    return results


# --- the table ------------------------------------------------------------------------------------
def render(results: dict) -> list[str]:
    rows = results["rows"]
    machines = sorted({r["machine"] for r in rows.values() if "machine" in r}) or [results["machine"]]
    where = (f"Machine: {machines[0]}." if len(machines) == 1 else
             f"Rows measured on {len(machines)} machines: " + "; ".join(
                 f"{', '.join(r['label'] for r in rows.values() if r.get('machine') == m)}: {m}" for m in machines) + ".")
    lines = [f"Written by `{results['command']}` on {results['date']}. {where}", "",
             "Each architecture at its published size with seeded random weights (no checkpoint is needed to "
             "check the hooks; parameters a fresh model starts at zero, such as output layers and EDM2's gains, "
             "drawn from N(0, 0.02²) so the output depends on the skips), one class-conditional or text-conditional model call at batch 1 and σ ≈ 1 "
             f"({results['calls']} calls each: bare, hooked at ρ = 1, hooked at a σ-dependent per_noise schedule). "
             "Hooks: the seconds spent inside the controller's hooks per call (σ capture and skip scaling), "
             "timed around each hook (on a GPU with a synchronize on each side). Peak: the measuring process's peak RSS on a CPU (the model, its inputs "
             "and Python), CUDA's peak allocation on a GPU.", "",
             "| architecture | built from | input | skips | parameters | s per call | hooks at ρ = 1 | "
             "hooks, σ-dependent | ρ = 1 bit-exact | ρ ≠ 1 changes it | peak memory |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    missing = []
    for key in ARCHITECTURES:
        r = rows.get(key)
        if r is None or "missing" in r or "failed" in r:
            needs = ARCHITECTURES[key][1]
            why = (f"failed: {r['failed']}" if r and "failed" in r else
                   f"needs a checkout of {CHECKOUTS[needs]}" if needs else "no result")
            missing.append(f"{ARCHITECTURES[key][0]} ({why})")
            continue
        call = statistics.median(r["bare_s"])
        lines.append(f"| {r['label']} | {r['source']} | {r['input']} | {r['skips']} | {r['params']:,} | "
                     f"{call:.3g} | {_ms(r['hooks_rho1_s'], call)} | {_ms(r['hooks_varying_s'], call)} | "
                     f"{'yes' if r['rho1_exact'] else 'NO'} | {'yes' if r['varying_changes'] else 'NO'} | "
                     f"{r['peak_bytes'] / 2**30:.2f} GiB |")
    if missing:
        lines += ["", f"Not measured: {'; '.join(missing)}. Give the checkout's path to `skiptune-search bench "
                      f"--tables 7` (--edm-path, --edm2-path, --uvit-path)."]
    return lines


def _ms(seconds: float, call: float) -> str:
    return f"{seconds * 1e3:.3g} ms ({100 * seconds / call:.2g}%)"


def main(argv: list[str] | None = None) -> None:
    """The child process: measure one architecture, print its results as one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skiptune_search.bench.sizes")
    parser.add_argument("key", choices=list(ARCHITECTURES))
    parser.add_argument("--checkout", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.key, args.checkout, args.calls, torch.device(args.device))))


if __name__ == "__main__":
    main()


register_table(Table(
    7, "Published sizes: the hooks on SD 1.5, SDXL, EDM, EDM2 and U-ViT with random weights",
    lambda ctx: run_sizes(ctx.checkouts, ctx.work / "sizes.json", ctx.stamp, ctx.device,
                          calls=1 if ctx.quick else 3, progress=ctx.progress),
    lambda ctx: render(r) if (r := ctx.results("sizes.json")).get("rows") else None,
    check=lambda ctx: check_checkouts(ctx.checkouts)))
