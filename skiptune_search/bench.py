"""Benchmarks that users size a search by: controller overhead and where a trial's time goes.

Numbers are medians over repeats in one process, with the compared variants interleaved;
ratios, not absolute times, unless on a GPU. The tables go to BENCHMARKS.md with the machine,
the versions and the exact command that produced them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import optuna
import torch

from .files import write_text_atomic
from .metrics import extract_features, fid_from_features, kid_from_features
from .schedule import RhoSchedule
from .search import Evaluator, Space, make_storage, open_study, run_search


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def controller_overhead(evaluator: Evaluator, n: int, repeats: int) -> list[dict]:
    """Sampling wall time with the controller attached at ρ = 1 (each placement) vs no controller."""
    ctl = evaluator.controller
    seeds = evaluator.task.seeds[:n]
    variants = {"no controller": None, **{f"{p}, ρ = 1": p for p in ("input", "normalized", "both")}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, placement in variants.items():  # interleaved, so drift hits every variant alike
            if placement is None:
                ctl.detach()
            else:
                ctl.attach()
                ctl.use(RhoSchedule.constant(ctl.arch, ctl.skips, [1.0] * len(ctl.skips), placement=placement))
            start = _clock(evaluator.device)
            evaluator.images(ctl.identity() if placement is None else ctl._schedule, seeds, progress=False)
            times[name].append(_clock(evaluator.device) - start)
    ctl.attach()
    base = statistics.median(times["no controller"])
    return [{"variant": name, "median_s": statistics.median(t), "ratio": statistics.median(t) / base}
            for name, t in times.items()]


def trial_breakdown(evaluator: Evaluator, repeats: int) -> dict:
    """One trial's wall time split into sampling, feature extraction, FID, KID, and Optuna/storage,
    plus sampling throughput vs bare UNet forwards at the same batch."""
    task = evaluator.task
    parts: dict[str, list[float]] = {k: [] for k in ("sampling", "features", "FID", "KID", "total")}
    for _ in range(repeats):
        start = _clock(evaluator.device)
        images = evaluator.images(evaluator.controller.identity(), progress=False)
        t1 = _clock(evaluator.device)
        feats = extract_features(images, evaluator.extractor, evaluator.batch_size)
        t2 = _clock(evaluator.device)
        fid_from_features(feats, evaluator.reference)
        t3 = time.perf_counter()
        if evaluator.reference.kid_features is not None:
            kid_from_features(feats, evaluator.reference)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - start, t2 - t1, t3 - t2, t4 - t3, t4 - start)):
            parts[key].append(value)
    med = {k: statistics.median(v) for k, v in parts.items()}
    # Optuna and storage: a whole trial through a SQLite study, minus what it spent scoring
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path("studies") / "bench.db"
    path.unlink(missing_ok=True)
    study = open_study(make_storage(f"sqlite:///{path}", heartbeat=None), "bench", task, Space(),
                       evaluator.controller, 0)
    start = time.perf_counter()
    run_search(evaluator, study, Space(), trials=1, progress=False)
    whole = time.perf_counter() - start
    path.unlink(missing_ok=True)
    med["Optuna and storage"] = max(0.0, whole - med["total"])
    # bare UNet forwards: the same batch, the same number of evaluations, no sampler around them
    x = torch.randn(min(evaluator.batch_size, task.n), *evaluator.shape, device=evaluator.device)
    sigma = torch.full((len(x),), 1.0, device=evaluator.device)
    with torch.inference_mode():
        evaluator.denoiser(x, sigma)
        start = _clock(evaluator.device)
        for _ in range(task.nfe):
            evaluator.denoiser(x, sigma)
        bare = _clock(evaluator.device) - start
    med["images/s sampling"] = task.n / med["sampling"]
    med["images/s bare forwards"] = len(x) / bare
    return med


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, optuna {optuna.__version__}, torch threads {torch.get_num_threads()}")


def write_markdown(out: Path, overhead: list[dict], breakdown: dict, evaluator: Evaluator, command: str,
                   n: int, repeats: int) -> Path:
    task = evaluator.task
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}; device {evaluator.device}.",
        f"Task: model {task.model}, {task.sampler} NFE {task.nfe}, batch {evaluator.batch_size}, "
        f"{task.features} features.",
        "",
        "## 1. Controller overhead (target ≤ 1.02x)",
        "",
        f"Sampling {n} images, medians of {repeats} interleaved repeats.",
        "",
        "| variant | median seconds | ratio to no controller |",
        "| --- | ---: | ---: |",
        *[f"| {r['variant']} | {r['median_s']:.3f} | {r['ratio']:.3f}x |" for r in overhead],
        "",
        "## 2. Where a trial's time goes (target ≥ 90% in UNet + feature forwards)",
        "",
        f"One trial of N = {task.n} samples, medians.",
        "",
        "| part | seconds | share |",
        "| --- | ---: | ---: |",
    ]
    total = breakdown["total"] + breakdown["Optuna and storage"]
    for key in ("sampling", "features", "FID", "KID", "Optuna and storage"):  # storage: a trial via Optuna minus scoring
        lines.append(f"| {key} | {breakdown[key]:.2f} | {100 * breakdown[key] / total:.1f}% |")
    lines += [
        f"| whole trial | {total:.2f} | 100% |",
        "",
        f"Sampling runs at {breakdown['images/s sampling']:.1f} images/s; the same UNet forwards without the "
        f"sampler around them would give {breakdown['images/s bare forwards']:.1f} images/s "
        f"({100 * breakdown['images/s sampling'] / breakdown['images/s bare forwards']:.0f}%).",
        "",
        "## 3-6. Proxy fidelity, search efficiency, the headline table, GPU scaling",
        "",
        "Not measured yet: they need hours of sampling (see the benchmarks issue).",
        "",
    ]
    return write_text_atomic(out, "\n".join(lines))


def run_bench(quick: bool, out: Path, model: str, nfe: int, command: str) -> Path:
    from .search import Task

    n, repeats = (64, 2) if quick else (250, 5)
    evaluator = Evaluator(Task(model=model, nfe=nfe, n=n), batch_size=min(250, n))
    overhead = controller_overhead(evaluator, n, repeats)
    breakdown = trial_breakdown(evaluator, max(1, repeats // 2))
    return write_markdown(out, overhead, breakdown, evaluator, command, n, repeats)
