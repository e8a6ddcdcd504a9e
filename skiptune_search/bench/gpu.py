"""GPU scaling (BENCHMARKS.md table 6): what a proxy trial costs on a real-sized model.

The bundled model's architecture (a diffusers UNet2DModel) scaled up to the sizes of EDM's 64 px
ADM network (192 base channels, multipliers 1-2-3-4, 3 blocks per level, attention at 32, 16 and
8 px; random weights, since only the speed is measured). Its blocks are diffusers' own, without
ADM's class embedding, scale-shift norm or BigGAN resampling, so its parameter count differs
from EDM's network; the table states it. Under the EDM
preconditioning with the skip controller attached and a non-trivial schedule in use. For each
batch size and precision (fp32, bf16 autocast): images/s of Heun sampling, and the seconds of
one proxy trial of N samples (sampling, feature extraction, FID and KID). At the smallest batch
also in channels_last memory format (throughput is flat in the batch once the GPU is full).
"""

from __future__ import annotations

import time

import torch

from ..core.controller import SkipController
from ..core.errors import InputError
from ..core.schedule import RhoSchedule
from ..models.denoisers import EDMPrecond
from ..sampling.images import to_uint8
from ..sampling.samplers import karras_sigmas, sample_heun, steps_for_nfe
from ..scoring import DEFAULT_FEATURES, PRECISIONS
from ..scoring.metrics import DEFAULT_REFERENCE, ReferenceStats, extract_features, fid_from_features, \
    kid_from_features, load_extractor
from ..scoring.task import autocast_dtype
from .tables import Table, register_table

# EDM's ImageNet-64 ADM sizes (Dhariwal & Nichol's 64 px network as EDM trains it)
ADM64 = dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 768),
             layers_per_block=3, attention_head_dim=64, norm_num_groups=32,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# the same shape, small: the code path on a CPU (bench --quick)
TINY = dict(ADM64, sample_size=16, block_out_channels=(8, 16, 16, 16), attention_head_dim=8, norm_num_groups=4,
            layers_per_block=1)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def build_model(config: dict, device: torch.device) -> tuple[EDMPrecond, SkipController]:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    denoiser = EDMPrecond(UNet2DModel(**config)).eval().requires_grad_(False).to(device)
    controller = SkipController(denoiser)
    controller.attach()
    controller.use(RhoSchedule.from_family("linear", controller.arch, controller.skips,
                                           {"rho_inner": 0.8, "rho_outer": 1.0}))
    return denoiser, controller


def images_per_second(denoiser, shape: tuple[int, ...], batch: int, nfe: int, precision: str,
                      device: torch.device, repeats: int = 2, channels_last: bool = False) -> float:
    """Heun sampling throughput at ``batch`` (best of ``repeats`` after a warm-up batch) in a
    search's ``precision`` (a key of PRECISIONS), in channels_last memory format (model and
    noise) or torch's default."""
    autocast = autocast_dtype(precision)
    sigmas = karras_sigmas(steps_for_nfe("heun", nfe), 0.002, 80.0).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    denoiser.to(memory_format=layout)
    best = float("inf")
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for k in range(repeats + 1):
            x = (torch.randn(batch, *shape, device=device) * 80.0).contiguous(memory_format=layout)
            start = _sync(device)
            to_uint8(sample_heun(denoiser, x, sigmas).float())
            if k:  # the first batch warms up kernels and the allocator
                best = min(best, _sync(device) - start)
    return batch / best


def scoring_seconds(n: int, resolution: int, device: torch.device) -> float:
    """Features of ``n`` images, then FID and KID against the bundled reference: what a trial
    spends after sampling."""
    extractor = load_extractor(DEFAULT_FEATURES).to(device)
    reference = ReferenceStats.load(DEFAULT_REFERENCE)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8)
    batch = min(250, n)
    extract_features(images[:batch], extractor, batch)  # warm-up at the timed batch size
    start = _sync(device)
    features = extract_features(images, extractor, batch)
    # FID and KID at each rung, as the default search scored them when this table was measured (N/4, N)
    for rung in sorted({max(2, n // 4), n}):
        fid_from_features(features[:rung], reference)
        kid_from_features(features[:rung], reference)
    return _sync(device) - start


def run_gpu_scaling(device: torch.device, batches: tuple[int, ...], nfe: int, n: int, quick: bool,
                    progress: bool = True) -> dict:
    """Rows of (batch, precision, memory format, images/s, seconds per proxy trial of ``n`` samples)."""
    config = TINY if quick else ADM64
    denoiser, _ = build_model(config, device)
    params = sum(p.numel() for p in denoiser.parameters())
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    scoring = scoring_seconds(n, config["sample_size"], device)
    variants = [(batch, precision, False) for batch in batches for precision in PRECISIONS]
    variants += [(batches[0], precision, True) for precision in PRECISIONS]
    rows = []
    for batch, precision, channels_last in variants:
        row = {"batch": batch, "precision": f"{precision} autocast" if PRECISIONS[precision] else precision,
               "memory_format": "channels_last" if channels_last else "contiguous", "images_per_s": None,
               "trial_s": None}
        try:
            rate = images_per_second(denoiser, shape, batch, nfe, precision, device, channels_last=channels_last)
            row.update(images_per_s=rate, trial_s=n / rate + scoring)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            rate = row["images_per_s"]
            print(f"batch {batch} {row['precision']} {row['memory_format']}: "
                  + ("out of memory" if rate is None else f"{rate:.1f} images/s"), flush=True)
    # fp32 rows run with torch's TF32 settings as they are (by default TF32 convolutions, fp32 matmuls)
    tf32 = {"convolutions": torch.backends.cudnn.allow_tf32, "matmuls": torch.backends.cuda.matmul.allow_tf32}
    return {"params": params, "resolution": config["sample_size"], "nfe": nfe, "n": n, "scoring_s": scoring,
            "rows": rows, "quick": quick, "tf32": tf32}


def render(r: dict) -> list[str]:
    what = ("a small stand-in of the same shape (--quick: the code path only)" if r["quick"]
            else "the bundled architecture (diffusers UNet2DModel) at the sizes of EDM's 64 px ADM")
    tf32 = r.get("tf32")
    tf32_note = (f" fp32 rows ran with TF32 {'on' if tf32['convolutions'] else 'off'} for convolutions and "
                 f"{'on' if tf32['matmuls'] else 'off'} for matmuls (torch's settings)." if tf32 else "")
    lines = [f"Written by `{r['command']}` on {r['date']}. Machine: {r['machine']}.", "",
             f"{what}, {r['params'] / 1e6:.1f}M parameters, random weights, skip controller attached "
             f"(linear 0.8 → 1.0); Heun NFE {r['nfe']}. A proxy trial is N = {r['n']} samples plus "
             f"{r['scoring_s']:.2f} s of features, FID and KID at N/4 and N.{tf32_note}", "",
             "| batch | precision | memory format | images/s | seconds per proxy trial |",
             "| ---: | --- | --- | ---: | ---: |"]
    for x in r["rows"]:
        rate = "out of memory" if x["images_per_s"] is None else f"{x['images_per_s']:.1f}"
        trial = "–" if x["trial_s"] is None else f"{x['trial_s']:.1f}"
        lines.append(f"| {x['batch']} | {x['precision']} | {x.get('memory_format', 'contiguous')} | {rate} | {trial} |")
    return lines + _speedups(r["rows"])


def _speedups(rows: list[dict]) -> list[str]:
    """What the rows say, as ratios: bf16 over fp32 at each batch, channels_last over contiguous."""
    rate = {(x["batch"], x["precision"], x.get("memory_format", "contiguous")): x["images_per_s"] for x in rows}
    ratios = []
    for (batch, precision, layout), value in rate.items():
        base = (rate.get((batch, "fp32", layout)) if precision != "fp32" else None,
                rate.get((batch, precision, "contiguous")) if layout != "contiguous" else None)
        for over, label in zip(base, ("fp32", "contiguous")):
            if value and over:
                ratios.append(f"{precision} {layout} / {label} at batch {batch}: {value / over:.2f}x")
    return ["", "Ratios of images/s: " + "; ".join(ratios) + "."] if ratios else []


def _check(ctx) -> None:
    if ctx.device.type != "cuda" and not ctx.quick:
        raise InputError("table 6 measures a GPU and none is visible to torch; leave 6 out of the tables on this "
                         "machine", option="tables")


def _measure(ctx) -> None:
    result = run_gpu_scaling(ctx.device, ctx.size["gpu_batches"], ctx.nfe, ctx.size["search_n"], ctx.quick,
                             ctx.progress)
    ctx.save("gpu.json", {**ctx.stamp, **result})


register_table(Table(6, "GPU scaling", _measure, lambda ctx: render(r) if (r := ctx.results("gpu.json")) else None,
                     check=_check, todo="Not measured yet: needs a GPU (`skiptune-search bench --tables 6`)."))
