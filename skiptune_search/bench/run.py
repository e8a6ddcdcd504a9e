"""Benchmarks that users size a search by, and the command that writes BENCHMARKS.md.

Tables 1-2 (here): controller overhead and where a trial's time goes. Numbers are medians over
repeats in one process, with the compared variants interleaved; ratios, not absolute times,
unless on a GPU. Tables 3-4 (search quality) are measured by search.py and rendered here, tables
5 and 8 live in headline.py, table 6 in gpu.py, table 7 in sizes.py; each is a ``Table``
registered in tables.py's registry, through which ``run_bench`` and ``write_markdown`` go.

Each table's raw results go to a JSON file in a work folder (``studies/bench``) as they are
measured, with the machine and the exact command; BENCHMARKS.md is rendered from all of them,
so tables measured by different runs (hours apart, or on another machine) sit side by side.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import version
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import InputError
from ..core.files import folder_lock, write_text_atomic
from ..core.schedule import RhoSchedule
from ..scoring.evaluator import Evaluator, Rung
from ..scoring.metrics import extract_features, fid_from_features, kid_from_features
from ..scoring.objectives import objective as objective_of
from ..scoring.task import Task, default_rungs
from ..search.objective import Objective
from ..search.optimizers import LEGACY_REDUCTION_FACTOR, NO_PRUNING, default_reduction_factor, pruning_text
from ..search.space import PAPER_RAMP, Space, log_spaced_knots
from ..search.storage import make_storage
from ..search.study import open_study
from .headline import RHO_METHODS
from .tables import Table, register_table


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def controller_overhead(evaluator: Evaluator, n: int, repeats: int) -> list[dict]:
    """Sampling wall time with the controller attached at ρ = 1 (each placement) vs no controller,
    and with two schedules that scale the skips (the paper's ramp; a σ-dependent per_noise one).

    Each repeat runs every variant once, in a fresh random order (so drift and order effects hit
    every variant alike); a variant's ratio is the median over repeats of its time over the
    baseline's time in the same repeat. "No controller, again" is a second copy of the baseline,
    whose ratio shows how far apart two identical runs come out on this machine (the noise floor)."""
    import random

    ctl = evaluator.controller
    seeds = evaluator.task.seeds[:n]
    knots = log_spaced_knots(*evaluator.sigma_range, 3)
    per_noise = {f"rho_{end}_k{k}": v for k, (inner, outer) in enumerate(((0.8, 1.0), (0.9, 0.95), (1.1, 1.0)))
                 for end, v in (("inner", inner), ("outer", outer))}
    variants = {"no controller": None, "no controller, again": None,
                **{f"{p}, ρ = 1": RhoSchedule.constant(ctl.arch, ctl.skips, [1.0] * len(ctl.skips), placement=p)
                   for p in ("input", "normalized", "both")},
                APPLIED[0]: RhoSchedule.from_family("linear", ctl.arch, ctl.skips, PAPER_RAMP),
                APPLIED[1]: RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, per_noise, sigma_knots=knots)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for k in range(repeats):
        random.Random(k).shuffle(order)
        for name in order:
            schedule = variants[name]
            if schedule is None:
                ctl.detach()
            else:
                ctl.attach()
                ctl.use(schedule)
            start = _clock(evaluator.device)
            evaluator.images(ctl.identity() if schedule is None else schedule, seeds, progress=False)
            times[name].append(_clock(evaluator.device) - start)
    ctl.attach()
    base = times["no controller"]
    # each repeat's time over the same repeat's baseline, then the median: drift between repeats cancels
    return [{"variant": name, "median_s": statistics.median(t),
             "ratio": statistics.median(a / b for a, b in zip(t, base)), "times": t} for name, t in times.items()]


def hook_cost(evaluator: Evaluator, calls: int, repeats: int) -> dict:
    """The controller's own cost per model call at ρ = 1, where it weighs most: seconds per call
    of the denoiser on a batch of one, attached vs detached, in adjacent runs of ``calls`` calls
    (which goes first alternates), paired run by run (the table gives their median and its 95%
    interval). At ρ = 1 every hook returns before touching a tensor, so this cost is the same at any batch."""
    ctl = evaluator.controller
    ctl.use(ctl.identity())
    x = torch.randn(1, *evaluator.shape, device=evaluator.device)
    sigma = torch.full((1,), 1.0, device=evaluator.device)

    def seconds_per_call(attached: bool) -> float:
        ctl.attach() if attached else ctl.detach()
        with torch.inference_mode():
            start = _clock(evaluator.device)
            for _ in range(calls):
                evaluator.denoiser(x, sigma)
            return (_clock(evaluator.device) - start) / calls

    seconds_per_call(False)  # warm-up
    extra, bare = [], []
    for k in range(repeats):
        t = {attached: seconds_per_call(attached) for attached in ((True, False) if k % 2 == 0 else (False, True))}
        extra.append(t[True] - t[False])
        bare.append(t[False])
    ctl.attach()
    return {"calls": calls, "repeats": repeats, "bare_s": statistics.median(bare),
            "extra_s": statistics.median(extra), "extra": extra}


# table 1's variants that change the samples: what scaling the skips costs on top of the hooks
APPLIED = ("input, paper ramp (ρ 0.8 → 1.0)", "input, per_noise (ρ per σ, 3 knots)")


def trial_breakdown(evaluator: Evaluator, repeats: int) -> dict:
    """One trial of the evaluator's task, as a search runs it (samples added rung by rung, FID and
    KID at each rung), split into sampling, feature extraction, FID, KID and Optuna/storage; plus
    sampling throughput vs bare UNet forwards at the same batch."""
    task = evaluator.task
    parts: dict[str, list[float]] = {k: [] for k in ("sampling", "features", "FID", "KID", "total")}
    identity = evaluator.controller.identity()
    # bare UNet forwards: one batch, as many evaluations as a sample takes, no sampler around them;
    # timed in every repeat beside the trial, so both medians see the same machine
    x = torch.randn(min(evaluator.batch_size, task.n), *evaluator.shape, device=evaluator.device)
    sigma = torch.full((len(x),), 1.0, device=evaluator.device)
    bare: list[float] = []
    with torch.inference_mode():
        evaluator.denoiser(x, sigma)
    for _ in range(repeats):
        spent = dict.fromkeys(parts, 0.0)
        feats, done = [], 0
        for rung in task.rungs:
            start = _clock(evaluator.device)
            images = evaluator.images(identity, task.seeds[done:rung], progress=False)
            t1 = _clock(evaluator.device)
            feats.append(extract_features(images, evaluator.extractor, evaluator.batch_size))
            t2 = _clock(evaluator.device)
            fid_from_features(torch.cat(feats), evaluator.reference)
            t3 = time.perf_counter()
            if evaluator.reference.kid_features is not None:
                kid_from_features(torch.cat(feats), evaluator.reference)
            t4 = time.perf_counter()
            for key, value in zip(parts, (t1 - start, t2 - t1, t3 - t2, t4 - t3, t4 - start)):
                spent[key] += value
            done = rung
        for key, value in spent.items():
            parts[key].append(value)
        with torch.inference_mode():
            start = _clock(evaluator.device)
            for _ in range(task.nfe):
                evaluator.denoiser(x, sigma)
            bare.append(_clock(evaluator.device) - start)
    med = {k: statistics.median(v) for k, v in parts.items()}
    med["Optuna and storage"] = optuna_overhead(task, evaluator.controller)
    med["images/s sampling"] = task.n / med["sampling"]
    med["images/s bare forwards"] = len(x) / statistics.median(bare)
    # the speed ratio within each repeat, then the median: this machine's drift between repeats cancels
    med["sampling / bare"] = statistics.median((task.n / s) / (len(x) / b) for s, b in zip(parts["sampling"], bare))
    return med


class MadeUpScorer:
    """Scores without sampling (100 + N at each rung): what isolates Optuna's own cost."""

    def __init__(self, rungs: tuple[int, ...]) -> None:
        self.rungs = rungs

    def score(self, schedule: RhoSchedule, progress: bool | str = False):
        for rung in self.rungs:
            yield Rung(rung, 100.0 + rung, 100.0 + rung)


def optuna_overhead(task, controller, trials: int = 16) -> float:
    """Mean seconds a trial spends in Optuna and its SQLite storage over a search of ``trials``
    trials (the default 16: queued, random start-up and TPE-proposed ones alike): the search's own
    objective, study set-up and first trials, with made-up scores instead of sampled ones."""
    import tempfile

    space = Space()
    with tempfile.TemporaryDirectory() as tmp:
        study = open_study(make_storage(f"sqlite:///{tmp}/bench.db", heartbeat=None), "bench", task, space,
                           controller, 0)
        objective = Objective(MadeUpScorer(task.rungs), space, controller.arch, controller.skips, task.rungs,
                              task.objective, task.seed_label)
        start = time.perf_counter()
        study.optimize(objective, n_trials=trials)
        return (time.perf_counter() - start) / trials


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, optuna {version('optuna')}, torch threads {torch.get_num_threads()}")



# --- the run: which tables, at which sizes ----------------------------------------------------
# full: the sizes the tables' targets are stated for; quick: a minute or two, to keep it working
# rungs and reduction_factor: the grid's task (tables 2-4) and the pruning of tables 3, 5 and 8, the
# default before issue 27 (their results were measured so); schedule_seeds: table 3's TPE replays
# that pick its schedules; replay_seeds and pruners: table 4's replays, (rungs, reduction factor
# [, min_resource]) beside the tool's default pruning for the grid's N
SIZES = {
    False: dict(n=250, repeats=15, hook_calls=(50, 41), grid_points=11, search_n=1000, rungs=(250, 1000),
                reduction_factor=3, low_rungs=(63, 125), schedule_seeds=5, replay_seeds=20,
                pruners=(((250, 1000), 3), ((63, 1000), 3), ((125, 1000), 3), ((63, 250, 1000), 4, 62)),
                trials=60, schedules=20, truth_n=10_000, batch=250, headline_nfes=(5, 9, 19), headline_seeds=3,
                headline_trials=16, headline_families=RHO_METHODS, warm_seeds=3,
                gpu_batches=(256, 512, 1024)),
    True: dict(n=64, repeats=2, hook_calls=(3, 2), grid_points=3, search_n=16, rungs=(4, 16), reduction_factor=3,
               low_rungs=(2,), schedule_seeds=2, replay_seeds=2, pruners=(((4, 16), 3),), trials=6, schedules=4,
               truth_n=32, batch=64, headline_nfes=None, headline_seeds=1, headline_trials=2,
               headline_families=("linear", "per_layer"), warm_seeds=1, gpu_batches=(4, 8)),
}
OPTIMIZERS = ("tpe", "cmaes", "gp", "random")


def run_bench(quick: bool, out: Path, work: Path, model: str, nfe: int, command: str,
              tables: tuple[int, ...] | None = None, truth_n: int | None = None, checkouts: dict | None = None,
              progress: bool = True) -> Path:
    """Measure ``tables`` (default: every registered one, ``bench.tables``), saving each table's
    raw results under ``work`` as they come, then render BENCHMARKS.md from everything ``work``
    holds. Every table asked for is checked (``Table.check``) before any is measured."""
    from ..scoring.task import resolve_device
    from .tables import Context, tables as registered

    size = SIZES[quick]
    device = resolve_device("auto")
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": f"{machine()}; device {device}"}
    ctx = Context(quick, size, work, model, nfe, command, stamp, device, truth_n or size["truth_n"],
                  {k: Path(v) for k, v in (checkouts or {}).items() if v}, progress)
    wanted = [t for t in registered() if tables is None or t.number in tables]
    for table in wanted:  # one line before hours of other tables
        if table.check is not None:
            table.check(ctx)
    # one measuring run per folder; rendering alone (no tables) reads the atomic results files
    with folder_lock(work, "skiptune-search bench") if wanted else contextlib.nullcontext():
        for table in wanted:
            table.measure(ctx)
    return write_markdown(out, work, size)


def _described(ctx, evaluator: Evaluator) -> dict:
    t = evaluator.task
    return {"model": ctx.model, "sampler": t.sampler, "nfe": ctx.nfe, "batch": evaluator.batch_size,
            "features": t.features, "n": t.n, "rungs": list(t.rungs)}


def _search_evaluator(ctx) -> Evaluator:
    """The default search's task (N samples, scored at each rung): tables 2-4 share it."""
    size = ctx.size
    return ctx.evaluator("search", lambda: Evaluator(Task(model=ctx.model, nfe=ctx.nfe, n=size["search_n"],
                                                          rungs=size["rungs"]),
                                                     batch_size=min(size["batch"], size["search_n"])))


def _measure_table1(ctx) -> None:
    size = ctx.size
    evaluator = Evaluator(Task(model=ctx.model, nfe=ctx.nfe, n=size["n"]), batch_size=min(size["batch"], size["n"]))
    rows = controller_overhead(evaluator, size["n"], size["repeats"])
    per_call = hook_cost(evaluator, *size["hook_calls"])
    ctx.save("table1.json", {**ctx.stamp, "task": _described(ctx, evaluator), "n": size["n"],
                             "repeats": size["repeats"], "rows": rows, "per_call": per_call})


def _measure_table2(ctx) -> None:
    evaluator = _search_evaluator(ctx)
    parts = trial_breakdown(evaluator, ctx.size["repeats"] // 2 + 1)
    ctx.save("table2.json", {**ctx.stamp, "task": _described(ctx, evaluator), "parts": parts})


def _grid(ctx, low_rungs: tuple[int, ...] = ()) -> dict:
    from . import search as BS

    return BS.run_grid(_search_evaluator(ctx), ctx.work / "grid.json", ctx.size["grid_points"], ctx.command,
                       ctx.stamp["machine"], ctx.progress, low_rungs)


def _measure_table4(ctx) -> None:
    """The linear grid (with its low rungs), table 5's NFE 5 searches warm-started (``bench.warm``:
    where table 5's studies are there), then every family's real searches (``bench.cost``)."""
    from . import cost, warm

    _grid(ctx, ctx.size["low_rungs"])
    if warm.available(ctx.results("headline.json"), ctx.size["warm_seeds"]):  # else its part says what it needs
        warm.run_warm(ctx.work / "headline.json", ctx.work / "warm.json", ctx.command, ctx.stamp["machine"],
                      seeds=ctx.size["warm_seeds"], batch=ctx.size["batch"], progress=ctx.progress)
    size = cost.SIZES[ctx.quick]
    cost.run_cost(ctx.model, ctx.work / "cost.json", ctx.command, ctx.stamp["machine"],
                  **{**size, "nfe": size["nfe"] or ctx.nfe}, progress=ctx.progress)


def _check_table3(ctx) -> None:
    """A truth.json of another truth_n: found out before anything is measured, not after tables 1-2."""
    saved = ctx.results("truth.json").get("settings", {}).get("truth_n", ctx.truth_n)
    if saved != ctx.truth_n:
        raise InputError(f"{ctx.work / 'truth.json'} holds table 3 on {saved:,} held-out samples per schedule, "
                         f"not {ctx.truth_n:,}: use {saved} to extend it, or another folder", option="truth_n")


def _measure_table3(ctx) -> None:
    from . import search as BS

    size = ctx.size
    results = _grid(ctx)
    pruner = (size["rungs"], size["reduction_factor"])  # the pruning its schedules were picked with
    tpe = BS.replays(results, ("tpe",), size["schedule_seeds"], size["trials"], ctx.work / "replays.json",
                     (pruner,))["tpe,on," + BS.pruning_key(*pruner)]
    keys = BS.pick_schedules(results, tpe, size["schedules"])
    BS.run_truth(_search_evaluator(ctx), ctx.work / "truth.json", keys, ctx.truth_n, ctx.command,
                 ctx.stamp["machine"], ctx.progress)


def _render_table3(ctx) -> list[str] | None:
    grid, truth = ctx.results("grid.json"), ctx.results("truth.json")
    return _table3(grid, truth, ctx.size) if grid and truth.get("truth") else None


def _render_table4(ctx) -> list[str] | None:
    from . import cost, warm

    grid, every, started = ctx.results("grid.json"), ctx.results("cost.json"), ctx.results("warm.json")
    lines = _table4(grid, ctx.size, ctx.work) if grid.get("grid") else []
    if every.get("runs") or lines:
        lines += ["", "### Every family: real searches, each to its family's target", "",
                  *(cost.render(every) if every.get("runs") else
                    ["Not measured yet: rerun `--tables 4` (every family's searches at NFE 5, a protocol sized "
                     "for about 20 CPU-hours on 2 cores; a stopped run resumes)."])]
    if lines or started.get("runs"):
        lines += ["", "### Warm starts", "", *(warm.render(started) if started.get("runs") else
                                               warm.unmeasured(ctx.results("headline.json"), ctx.size["warm_seeds"]))]
    return lines or None


def _rendered(name: str, render: Callable[[dict], list[str]]) -> Callable:
    """A render of the results file ``name`` alone (None when there is none)."""
    return lambda ctx: render(r) if (r := ctx.results(name)) else None


# --- BENCHMARKS.md ----------------------------------------------------------------------------
def _header(r: dict) -> str:
    machines = r.get("machines") or [r["machine"]]
    where = (f"Machine: {machines[0]}." if len(machines) == 1 else
             f"Measured in parts on {len(machines)} machines: {'; '.join(machines)}.")
    return f"Written by `{r['command']}` on {r['date'] if 'date' in r else '?'}. {where}"


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median: the k-th smallest and k-th largest value, k
    the largest with P(Binomial(n, 1/2) < k) ≤ (1 - level) / 2; None when n is too small for one."""
    from scipy.stats import binom

    v, n = sorted(values), len(values)
    k = max((j for j in range(1, n // 2 + 1) if binom.cdf(j - 1, n, 0.5) <= (1 - level) / 2), default=0)
    return (v[k - 1], v[n - k]) if k else None


def _ratio_intervals(rows: list[dict]) -> dict[str, tuple[float, float] | None]:
    """Each variant's 95% interval for its median ratio to the baseline of the same repeat."""
    base = next(x["times"] for x in rows if x["variant"] == "no controller")
    return {x["variant"]: median_interval([a / b for a, b in zip(x["times"], base)]) for x in rows
            if x["variant"] != "no controller"}


def _table1(r: dict) -> list[str]:
    t = r["task"]
    intervals = _ratio_intervals(r["rows"])
    shown = {k: f"{v[0]:.3f}-{v[1]:.3f}x" for k, v in intervals.items() if v}
    return [
        _header(r), "",
        f"Model {t['model']}, {t['sampler']} NFE {t['nfe']}, batch {t['batch']}: sampling {r['n']} images, "
        f"medians of {r['repeats']} repeats, the variants in a new random order each time. The interval "
        "holds the median ratio with 95% confidence (order statistics of the per-repeat ratios, no "
        "assumption on their distribution).", "",
        "| variant | median seconds | median ratio to no controller in the same repeat | 95% interval |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {x['variant']} | {x['median_s']:.3f} | {x['ratio']:.3f}x | {shown.get(x['variant'], '–')} |"
          for x in r["rows"]],
        *_overhead_verdict(r["rows"], intervals),
        *(["The last two rows apply a schedule (ρ ≠ 1, input placement): the controller's cost while it "
           "scales the skips, which the target (at ρ = 1) does not cover."]
          if any(x["variant"] in APPLIED for x in r["rows"]) else []),
        *(["", *_per_call_verdict(r)] if "per_call" in r else []),
    ]


def _overhead_verdict(rows: list[dict], intervals: dict[str, tuple[float, float] | None]) -> list[str]:
    """Met when the largest median ratio at ρ = 1 is ≤ 1.02; said plainly when this machine's noise
    (the 95% intervals) cannot tell whether it is."""
    def span(x: dict) -> tuple[float, float]:
        return intervals.get(x["variant"]) or (x["ratio"], x["ratio"])  # too few repeats: the median alone

    at_one = [x for x in rows if "ρ = 1" in x["variant"]]
    worst = max(at_one, key=lambda x: x["ratio"])
    highest = max(span(x)[1] for x in at_one)
    again = next((x for x in rows if x["variant"] == "no controller, again"), None)
    noise = (f"; two identical runs without the controller came out {again['ratio']:.3f}x "
             f"({span(again)[0]:.3f}-{span(again)[1]:.3f}x)" if again else "")
    if worst["ratio"] <= 1.02 and highest <= 1.02:
        verdict = "met"
    elif worst["ratio"] <= 1.02:
        verdict = f"met by the medians, though an interval reaches {highest:.3f}x: this machine cannot confirm 2%{noise}"
    elif span(worst)[0] <= 1.02:
        verdict = f"not resolved here, its interval {span(worst)[0]:.3f}-{span(worst)[1]:.3f}x holds 1.02{noise}"
    else:
        verdict = "not met"
    return ["", f"Largest overhead: {worst['variant']}, {worst['ratio']:.3f}x (target ≤ 1.02x: {verdict})."]


def _per_call_verdict(r: dict) -> list[str]:
    """The hooks' cost per model call (measured on a batch of one, where it weighs most) as a
    share of a call at the table's batch: what the wall-clock rows above cannot resolve when the
    machine is noisy."""
    c, t = r["per_call"], r["task"]
    base = next(x["median_s"] for x in r["rows"] if x["variant"] == "no controller")
    calls = -(-r["n"] // t["batch"]) * t["nfe"]  # model calls in one sampling run of the rows above
    call_s = base / calls
    interval = median_interval(c["extra"])
    low, high = interval or (c["extra_s"], c["extra_s"])
    verdict = "met" if high / call_s <= 0.02 else "not met" if low / call_s > 0.02 else "not resolved here"
    where = (f"95% interval {1e6 * low:.0f} to {1e6 * high:.0f} µs" if interval else "too few pairs for an interval")
    return [f"Per model call, where the hooks weigh most (a batch of one, {c['calls']} calls per run, median of "
            f"{c['repeats']} pairs of adjacent runs with and without the controller at ρ = 1): the controller adds "
            f"{1e6 * c['extra_s']:.0f} µs ({where}) to a call of {1e3 * c['bare_s']:.1f} ms. At ρ = 1 its hooks "
            f"return before touching a tensor, so this cost does not grow with the batch: at batch {t['batch']} a "
            f"call takes {call_s:.3f} s ({base:.2f} s over {calls} calls), so the controller adds "
            f"{100 * c['extra_s'] / call_s:.2f}% of it, at most {100 * high / call_s:.2f}% "
            f"(target ≤ 2%: {verdict})."]


def _table2(r: dict) -> list[str]:
    p, t = r["parts"], r["task"]
    total = p["total"] + p["Optuna and storage"]
    lines = [_header(r), "", f"Model {t['model']}, {t['sampler']} NFE {t['nfe']}, batch {t['batch']}, "
             f"{t['features']} features: one trial of N = {t['n']} samples scored at rungs "
             f"{','.join(map(str, t['rungs']))} (as the default search runs it). Each part is a median over "
             f"repeats, so the parts need not add up to the whole exactly; Optuna and storage: the mean "
             f"trial of a 16-trial search, TPE fitted from trial 8 on.", "",
             "| part | seconds | share |", "| --- | ---: | ---: |"]
    for key in ("sampling", "features", "FID", "KID", "Optuna and storage"):  # storage: its own timer
        lines.append(f"| {key} | {p[key]:.2f} | {100 * p[key] / total:.1f}% |")
    lines += [f"| whole trial | {total:.2f} | 100% |", "",
              f"UNet and feature forwards (sampling + features): "
              f"{100 * (p['sampling'] + p['features']) / total:.1f}% of the trial (target ≥ 90%).",
              f"Sampling runs at {p['images/s sampling']:.1f} images/s; the same UNet forwards without the "
              f"sampler around them would give {p['images/s bare forwards']:.1f} images/s "
              f"(sampling at {100 * p['sampling / bare']:.0f}% of their speed, the median of each repeat's ratio)."]
    return lines


def _table3(grid: dict, truth: dict, size: dict) -> list[str]:
    from . import search as BS

    # the proxies come from the grid, the truth from truth.json: both must be of one task
    if differences := BS.settings_differences({"task": grid["settings"]["task"]}, {"task": truth["settings"]["task"]}):
        return [_header(truth), "", f"Not rendered: truth.json and grid.json were measured on different tasks "
                                    f"({'; '.join(differences)}); remeasure one of them."]
    rungs = tuple(grid["settings"]["task"]["rungs"])
    keys = [k for k in truth["truth"] if k in grid["grid"]]
    rows = BS.proxy_fidelity(grid["grid"], truth["truth"], rungs, keys)
    s = truth["settings"]
    done = f"{len(keys)} of {size['schedules']}" if len(keys) < size["schedules"] else str(len(keys))
    lines = [_header(truth), "",
             f"{done} schedules of the linear grid (the baseline, the best points the TPE replays found, the "
             f"rest at random). Proxies on the search's seeds {s['task']['seed']}-"
             f"{s['task']['seed'] + s['task']['n'] - 1}; truth: FID on {s['truth_n']:,} held-out samples "
             f"(seeds from {s['held_out_seed']:,}). Spread: std of the proxy over the held-out blocks of "
             f"{s['task']['n']} samples (median over schedules), next to its std across the schedules.", "",
             "| proxy | Spearman, all | Spearman, better half | seed-to-seed spread | spread across schedules |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['proxy']} | {r['spearman']:.3f} | {r['spearman_better_half']:.3f} | {BS.fmt(r['seed_spread'])} | "
              f"{BS.fmt(r['schedule_spread'])} |" for r in rows]
    objective = s["task"].get("objective", "fid")
    used = f"{objective}@{s['task']['n']}" if objective_of(objective).per_rung else objective
    mine = next((r for r in rows if r["proxy"] == used), None)
    if mine and len(keys) >= size["schedules"]:
        top = max(rows, key=lambda r: r["spearman"])
        lines += ["", f"The searches here optimized {used}: Spearman {mine['spearman']:.3f} over all schedules "
                  f"(target ≥ 0.9: {'met' if mine['spearman'] >= 0.9 else 'not met'}). The best-ranking proxy is "
                  f"{top['proxy']} ({top['spearman']:.3f})."]
    return lines


def _table4(grid: dict, size: dict, work: Path) -> list[str]:
    from . import search as BS

    s = grid["settings"]
    points = s["points"]
    n = str(s["task"]["rungs"][-1])
    if len(grid["grid"]) < points * points:
        done = grid["grid"]
        best_key = min(done, key=lambda k: done[k]["fid"][n])
        base = done.get(BS.point_key(1.0, 1.0))
        return [_header(grid), "",
                f"Grid incomplete: {len(done)} of {points * points} points (drawn in a seeded random order) so far; "
                f"rerun the same command to finish it. Best so far: FID {done[best_key]['fid'][n]:.4g} at "
                f"(ρ_inner, ρ_outer) = ({best_key}), N = {n}"
                + (f"; baseline (1, 1): {base['fid'][n]:.4g}." if base else "; the baseline (1, 1) is not done yet.")]
    best_key = min(grid["grid"], key=lambda k: grid["grid"][k]["fid"][n])
    best = grid["grid"][best_key]["fid"][n]
    base = grid["grid"][BS.point_key(1.0, 1.0)]["fid"][n]
    # each optimizer's own pruning, as the tool searches the grid's N with it (GP's: none)
    first = default_rungs(int(n))
    defaults = {o: (first, f) for o in OPTIMIZERS if (f := default_reduction_factor(o)) != NO_PRUNING}
    held = lambda p: all(str(r) in point["fid"] for point in grid["grid"].values() for r in p[0])  # noqa: E731
    pruners = {BS.pruning_key(*p): p for p in (*dict.fromkeys(defaults.values()), *size["pruners"]) if held(p)}
    seeds = size["replay_seeds"]
    every = [r for r in BS.search_efficiency(grid, BS.replays(grid, OPTIMIZERS, seeds, size["trials"],
                                                              work / "replays.json", tuple(pruners.values())))
             if r["pruner"] is None or r["pruner"] in pruners]
    own = {o: BS.pruning_key(*defaults[o]) if o in defaults else None for o in OPTIMIZERS}
    before = BS.pruning_key(s["task"]["rungs"], size.get("reduction_factor", LEGACY_REDUCTION_FACTOR))
    rows = [r for r in every if r["pruner"] in (None, own[r["optimizer"]])]
    shown = "; ".join(f"{', '.join(o for o in OPTIMIZERS if defaults.get(o) == p)}: {pruning_text(*p)}"
                      for p in dict.fromkeys(defaults.values()))
    shown += "".join(f"; {o}: no pruning" for o in OPTIMIZERS if o not in defaults)
    with_pruning = (f"pruning on: rungs {','.join(map(str, first))}, each optimizer's own pruning, the tool's default "
                    f"for N = {n} ({shown})" if set(own.values()) - {None} <= set(pruners) else
                    f"pruning on not replayed yet: the grid lacks FID at {first[0]} samples for some points")
    lines = [_header(grid), "",
             f"Ground truth: all {points}x{points} (ρ_inner, ρ_outer) of the linear family in [0.5, 1.5], "
             f"{s['placement']} placement, FID at N = {n} on seeds {s['task']['seed']}-"
             f"{s['task']['seed'] + int(n) - 1} ({s['task']['sampler']} NFE {s['task']['nfe']}). "
             f"Baseline (1, 1): {base:.4g}; grid best {best:.4g} at ({best_key}); target ≤ {1.01 * best:.4g} (1%).",
             f"Each optimizer is replayed {seeds} times (search seeds 0-{seeds - 1}) for up to "
             f"{size['trials']} trials on the same grid (Optuna {version('optuna')}), baseline and paper ramp first; "
             f"{with_pruning}; pruning off: N only. Medians over the seeds that reached the target.", "",
             "| optimizer | pruning | seeds reaching 1% | median trials | median samples | "
             "median best after 16 trials | median samples in 16 trials |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['optimizer']} | {'on' if r['pruning'] else 'off'} | {r['reached']}/{r['seeds']} | "
              f"{BS.fmt(r['median_trials'], 'g')} | {BS.fmt(r['median_samples'], ',.0f')} | "
              f"{r['median_best_at_default']:.4g} | {r['median_samples_at_default']:,.0f} |" for r in rows]
    # pruning on vs off, seed by seed: both replays of a search seed start alike, so compare them pairwise
    per_seed = {(r["optimizer"], r["pruner"]): r.get("samples_to_target", []) for r in every}
    saved = []
    for o in OPTIMIZERS:
        if own[o] and (cut := BS.pruning_saving(per_seed.get((o, own[o]), []), per_seed.get((o, None), []))):
            saved.append(f"{o} {cut[0]:.0f}% ({cut[1]} seed{'s' * (cut[1] > 1)})")
    if saved:
        lines += ["", "Samples saved by successive halving on the way to the same target (per search seed, "
                  "samples with pruning vs without, median over the seeds that got there both ways): "
                  + ", ".join(saved) + "."]
    if any(r["pruner"] not in (None, own[r["optimizer"]]) for r in every):
        lines += ["", f"Pruning variants, the default first (rungs below {s['task']['rungs'][0]} are answered by the "
                  f"grid's FID on each point's first samples, the same seeds). Saving: samples to target vs the same "
                  f"search seed without pruning (median over seeds reaching it both ways).", "",
                  "| optimizer | rungs | pruning | seeds reaching 1% | median trials | median samples | samples saved |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for o in OPTIMIZERS:
            off = per_seed.get((o, None), [])
            for r in sorted((x for x in every if x["optimizer"] == o),
                            key=lambda x: (x["pruner"] != own[o], x["pruner"] is None)):
                if r["pruner"] is None:
                    rungs, text, cut = s["task"]["rungs"][-1:], "none", None
                else:
                    rungs, text = pruners[r["pruner"]][0], pruning_text(*pruners[r["pruner"]])
                    cut = BS.pruning_saving(r["samples_to_target"], off)
                mark = {own[o]: " (default)", before: " (the default before)"}.get(r["pruner"], "")
                lines.append(f"| {o} | {','.join(map(str, rungs))} | {text}{mark} | "
                             f"{r['reached']}/{r['seeds']} | {BS.fmt(r['median_trials'], 'g')} | "
                             f"{BS.fmt(r['median_samples'], ',.0f')} | {f'{cut[0]:.0f}%' if cut else '–'} |")
    return lines


def write_markdown(out: Path, work: Path, size: dict) -> Path:
    """BENCHMARKS.md from the results files in ``work``: every registered table (``bench.tables``)
    in number order, each saying which command and machine measured it; a table with no results
    says so."""
    from .tables import Context, tables

    ctx = Context(quick=False, size=size, work=work)
    lines = ["# Benchmarks", "",
             "Written by `skiptune-search bench`, table by table: each says the command and machine that measured it."]
    for table in tables():
        lines += ["", f"## {table.number}. {table.title}", "",
                  *(table.render(ctx) or [table.todo])]
    return write_text_atomic(out, "\n".join([*lines, ""]))


register_table(Table(1, "Controller overhead (target ≤ 1.02x)", _measure_table1, _rendered("table1.json", _table1)))
register_table(Table(2, "Where a trial's time goes (target ≥ 90% in UNet + feature forwards)", _measure_table2,
                     _rendered("table2.json", _table2)))
register_table(Table(3, "Proxy fidelity (target: Spearman ≥ 0.9 for the default objective and rung)",
                     _measure_table3, _render_table3, check=_check_table3))
register_table(Table(4, "Search efficiency (trials to come within 1% of the grid's best; every family's to its target)",
                     _measure_table4, _render_table4))
