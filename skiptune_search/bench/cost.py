"""What a search costs per family (BENCHMARKS.md table 4, second part).

Table 4's first part replays the optimizers on the linear family's exhaustive grid, a lookup.
No other family has a grid, so here every search is real: for each searched method (a ρ family,
or a FreeU one), optimizer, pruning on and off, and search seed, a study of ``trials`` trials at a
cheap protocol (a low NFE, a small N with its rungs). The target of a method is its reference
best (the best N-sample FID any of its searches found) plus the proxy's seed-to-seed spread (the
std of FID at N between blocks of N held-out samples, measured on that best and on the untuned
model): a search has reached the target at its first trial scoring at or below it.

Cost is what each search would spend on its own: its trials' samples (a pruned trial's up to
its rung; a repeated proposal, recorded ``same_as``, none). The run itself samples a schedule
only once: every score is cached by what the schedule does at each of the sampler's model
calls, so the untuned model, the presets and a point two searches share are sampled once for
all of them (the cache counts as samples spent by the run, not by the searches).

The studies live in one SQLite file beside the results, and every finished search and score is
written to the JSON results file at once: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from ..core.schedule import RhoSchedule
from ..models.loaders import weights_fingerprint
from ..scoring.evaluator import Evaluator, Rung
from ..scoring.metrics import fid_from_features
from ..scoring.task import Task, default_rungs
from ..search import default_optimizer
from ..search.objective import calls_key, run_search
from ..search.optimizers import (LEGACY_REDUCTION_FACTOR, NO_PRUNING, default_reduction_factor, pruning_text,
                                 wilcoxon_pruner)
from ..search.storage import make_storage
from ..search.study import open_study
from .headline import fixed_schedule, method_space
from .search import (HELD_OUT_SEED, _reach, check_same_settings, fmt, load_results, pruning_saving, save_results,
                     stamp_run, with_legacy_factor)

EIGHTH = 8  # the protocol's successive halving factor: every optimizer's default until TPE's was decided here
WILCOXON = "wilcoxon"  # a variant pruned by Optuna's WilcoxonPruner over blocks of samples (``CachedScorer``)


def blocks(n: int, k: int) -> tuple[int, ...]:
    """The rungs that split N samples into ``k`` blocks of N/k (rounded)."""
    return tuple(round(n * (i + 1) / k) for i in range(k))


# the protocol: full, at most about 20 CPU-hours on a 2-core machine, pruned as the tool pruned a
# search of N = 500 by default when these searches began (keeping the best eighth at 62, whatever
# the optimizer: ``EIGHTH``); quick (nfe None: bench's --nfe), to keep it working
# variants: other prunings, (rungs, reduction factor, the methods searched with it or None for all,
# the optimizers), searched after a method's own rows:
# - a first rung of 125 samples, as the default run's (N = 1,000) first rung, where the protocol's 62
#   ranks near-best trials mostly by noise: on linear and per_level it reached the target at no more
#   seeds and saved fewer samples than the default pruning (2026-12-03), so no other method has it;
# - keeping the best third at 62 (TPE): the search before issue 27 (next) reached the target at every
#   seed on linear and per_level, where the default pruning lost one with TPE; it did too, in as many
#   trials as without pruning, saving 36-39% of the samples (2026-12-03), so every method has it: is
#   it the pruning TPE should search with?
# - a third at 62 and again at 250: on linear and per_level, at every seed too, in more trials on
#   linear (16 against 12) and saving 32% and 44%, so no other method has it;
# - the search before issue 27 (``before_key``: TPE, rungs N/4 and N keeping the best third), what
#   item 2 asks each method's default optimizer to spend fewer samples than;
# - Optuna's WilcoxonPruner over 16 blocks of N/16 samples (``WILCOXON``), which issue 27 names: it
#   can prune only from the 4th block on (a one-sided signed-rank test over 3 blocks cannot reach
#   p < 0.1), so 16 blocks, where 8 could save less than half of a pruned trial's samples. On linear
#   and per_level it reached the target at every seed in as many trials as without pruning, but
#   saved 27% and 17% (a third at 62: 36% and 39%): TPE's trials cluster near the best, where
#   blocks of 31 samples seldom tell them apart (2026-12-03), so no other method has it. Its searches
#   took about twice the process time, partly the results file saved after each of 16 rungs
SIZES = {False: dict(nfe=5, methods=None, optimizers=("tpe", "cmaes", "gp", "random"), seeds=3, trials=30, n=500,
                     rungs=default_rungs(500), reduction_factor=EIGHTH, blocks=8, batch=250,
                     variants=((blocks(500, 16), WILCOXON, ("linear", "per_level"), ("tpe",)),
                               ((125, 500), EIGHTH, ("linear", "per_level"), ("tpe", "cmaes")),
                               ((62, 500), LEGACY_REDUCTION_FACTOR, None, ("tpe",)),
                               ((62, 250, 500), LEGACY_REDUCTION_FACTOR, ("linear", "per_level"), ("tpe",)),
                               ((125, 500), LEGACY_REDUCTION_FACTOR, None, ("tpe",)))),
         True: dict(nfe=None, methods=("linear", "freeu"), optimizers=("tpe",), seeds=1, trials=3, n=16, rungs=(4, 16),
                    reduction_factor=EIGHTH, blocks=2, batch=16,
                    variants=(((4, 16), LEGACY_REDUCTION_FACTOR, None, ("tpe",)), (blocks(16, 4), WILCOXON, None, ("tpe",))))}
METHODS = ("linear", "per_level", "freeu_allsteps", "per_layer", "per_noise", "freeu", "linear_freeu")
# item 2 of issue 27: the trials a method's default optimizer should need, as a median over search seeds
TRIAL_TARGETS = {"linear": 10, "per_level": 10, "freeu_allsteps": 10, "per_layer": 25, "per_noise": 25,
                 "freeu": 25, "linear_freeu": 25}
PRUNING_TARGET = 50  # item 3: the share of samples (%) pruning should save on the way to target, in no more trials


class CachedScorer:
    """The evaluator of one search, its scores taken from ``cache`` where the same model calls were
    scored before (by any search of the run) and added to it where not. ``cache`` maps a schedule's
    ``calls_key`` to its FID at each rung scored so far ('500'), and to the FID of a block of samples
    alone ('250-281').

    ``blocks`` (for ``WILCOXON``): each rung before the last yields the FID of its own samples alone
    (those after the previous rung), the per-block values Optuna's WilcoxonPruner pairs with the
    best trial's; the last rung yields FID at N, the trial's value, as without."""

    def __init__(self, evaluator: Evaluator, task: Task, cache: dict, save, blocks: bool = False) -> None:
        self.evaluator, self.task, self.cache, self.save, self.blocks = evaluator, task, cache, save, blocks

    def __getattr__(self, name):  # the controller, call_sigmas, ... of the evaluator
        return getattr(self.evaluator, name)

    def score(self, schedule: RhoSchedule, progress: bool | str = False):
        key = calls_key(schedule, self.evaluator.call_sigmas, self.evaluator.controller.hidden_channels())
        rungs = self.task.rungs
        names = [f"{start}-{n}" if self.blocks and n != rungs[-1] else str(n) for start, n in zip((0, *rungs), rungs)]
        known = self.cache.get(key, {})
        if all(name in known for name in names):
            for n, name in zip(rungs, names):
                yield Rung(n, known[name])
            return
        start = 0
        for rung, name in zip(self.evaluator.score(schedule, rungs=rungs, progress=progress, kid=False), names):
            entry = self.cache.setdefault(key, {})
            entry[str(rung.n)] = rung.fid
            if name != str(rung.n):
                entry[name] = fid_from_features(rung.features[start:], self.evaluator.reference)
                rung = dataclasses.replace(rung, fid=entry[name])
            start = rung.n
            self.save()
            yield rung


def study_name(nfe: int, method: str, optimizer: str, prune: bool, seed: int, variant: str = "") -> str:
    """The study of one search; ``variant``: its pruning's ``variant_key``, for a pruning variant."""
    tail = "-" + variant.replace(",", "-") if variant else ""
    return f"cost-nfe{nfe}-{method}-{optimizer}-{'on' if prune else 'off'}-seed{seed}{tail}"


def variant_key(rungs, reduction_factor: int | str) -> str:
    """A pruning variant as results name it: '125-500,rf8'; '31-62-...-500,wilcoxon'."""
    return "-".join(map(str, rungs)) + (f",{reduction_factor}" if reduction_factor == WILCOXON
                                        else f",rf{reduction_factor}")


def variant_pruning(key: str) -> tuple[list[int], int | str]:
    """The rungs and reduction factor (or ``WILCOXON``) of a ``variant_key``."""
    rungs, factor = key.split(",")
    return [int(r) for r in rungs.split("-")], factor if factor == WILCOXON else int(factor.removeprefix("rf"))


def variant_text(rungs, factor: int | str) -> str:
    """A variant's pruning as the table says it."""
    if factor == WILCOXON:
        sizes = [b - a for a, b in zip((0, *rungs), rungs)]
        size = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        return (f"Optuna's WilcoxonPruner (p < 0.1) on the FID of each of {len(rungs)} blocks of {size} samples, "
                f"against the best trial's")
    return pruning_text(rungs, factor)


def row_key(method: str, optimizer: str, pruning: str) -> str:
    """A row of the results ('per_level,tpe,on'; a variant's pruning is its ``variant_key``)."""
    return f"{method},{optimizer},{pruning}"


def row_of(key: str) -> tuple[str, str, str]:
    """(method, optimizer, pruning) of a ``row_key``."""
    method, optimizer, pruning = key.split(",", 2)
    return method, optimizer, pruning


def before_key(n: int) -> str:
    """The pruning of a search of N samples before issue 27 (rungs N/4 and N, keeping the best
    third), as ``variant_key`` names it; TPE was every family's optimizer then."""
    return variant_key((n // 4, n), LEGACY_REDUCTION_FACTOR)


def run_cost(model: str, path: Path, command: str, machine: str, *, nfe: int, methods: tuple[str, ...] | None,
             optimizers: tuple[str, ...], seeds: int, trials: int, n: int, rungs: tuple[int, ...],
             reduction_factor: int, blocks: int, batch: int, variants: tuple = (), progress: bool = True) -> dict:
    """Every search of the plan, method by method (each method's search seeds, optimizers and
    pruning), each method's followed by the proxy's spread on its reference best (and, first of all,
    on the untuned model): a method's rows in the table are final as soon as its searches are done.
    Then the method's searches with each pruning of ``variants`` ((rungs, reduction factor, the
    methods it is for or None for all, the optimizers)), kept apart under ``variants`` in the
    results."""
    methods = methods or METHODS
    results = load_results(path)
    on_task = Task(model=model, nfe=nfe, n=n, rungs=rungs)
    evaluator = Evaluator(on_task, batch_size=min(batch, n))
    ctl = evaluator.controller
    settings = {"model": model, "nfe": nfe, "trials": trials, "n": n, "rungs": list(rungs),
                "reduction_factor": reduction_factor, "blocks": blocks,
                "held_out_seed": HELD_OUT_SEED, "weights": weights_fingerprint(ctl.unet)}
    check_same_settings(path, "search-cost results", with_legacy_factor(results.get("settings")), settings)
    stamp_run(results, settings, command, machine)
    results["plan"] = {"methods": list(methods), "optimizers": list(optimizers), "seeds": seeds,
                       "variants": {variant_key(r, f): {"methods": [m for m in methods if only is None or m in only],
                                                        "optimizers": list(opts)} for r, f, only, opts in variants}}
    cache = results.setdefault("cache", {})
    save = lambda: save_results(path, results)  # noqa: E731 - every finished number at once
    storage = make_storage(f"sqlite:///{Path(path).with_suffix('.db')}", heartbeat=None)
    tasks = {True: on_task, False: Task(model=model, nfe=nfe, n=n, rungs=(n,))}
    runs, by_variant = results.setdefault("runs", {}), results.setdefault("variants", {})
    partial = results.setdefault("partial", {})  # process time of each search under way, as its scores are saved
    total, count = seeds * len(methods) * len(optimizers) * 2, 0
    extra = seeds * sum(len(v["methods"]) * len(v["optimizers"]) for v in results["plan"]["variants"].values())
    extra_count = 0
    spread = results.setdefault("spread", {})
    held_out = [list(range(HELD_OUT_SEED + b * n, HELD_OUT_SEED + (b + 1) * n)) for b in range(blocks)]

    def measure_spread(method: str) -> None:  # FID at N over the held-out blocks of the method's best
        best = reference_best(results, method) if method != "untuned" else None
        if method != "untuned" and best is None:
            return
        params = best["params"] if best else {}
        if spread.get(method, {}).get("params") == params:
            return
        schedule = (fixed_schedule(evaluator, "untuned") if best is None
                    else method_space(evaluator, method).schedule(ctl.arch, ctl.skips, params))
        fids = [next(evaluator.score(schedule, rungs=(n,), seeds=seeds_, kid=False,
                                     progress=progress and f"spread {method} block {b + 1}/{blocks}")).fid
                for b, seeds_ in enumerate(held_out)]
        spread[method] = {"params": params, "fids": fids, "std": statistics.stdev(fids)}
        save()

    def search(logs: list, space, optimizer: str, seed: int, task: Task, factor: int, name: str,
               label: str) -> None:  # one search, resumed where it stopped; its log appended to logs
        wilcoxon = factor == WILCOXON
        study = open_study(storage, name, task, space, ctl, seed, optimizer, warm_start=False,
                           reduction_factor=NO_PRUNING if wilcoxon else factor)
        if wilcoxon:  # no successive halving (recorded 0; studies before 2026-12-03: TPE's 3, unused): the pruner here
            study.pruner = wilcoxon_pruner()
            study.set_user_attr("pruner", WILCOXON)
        start = time.process_time() - partial.get(name, 0.0)  # an interrupted run's share counts

        def save_search() -> None:
            partial[name] = round(time.process_time() - start, 1)
            save()

        run_search(CachedScorer(evaluator, task, cache, save_search, blocks=wilcoxon), study, space, trials,
                   progress=progress and label)
        logs.append({"seed": seed, "trials": trial_log(study), "cpu_seconds": round(time.process_time() - start, 1)})
        partial.pop(name, None)
        save()

    for method in methods:
        space = method_space(evaluator, method)
        for seed in range(seeds):
            for optimizer in optimizers:
                for prune in (True, False):
                    pruning, count = "on" if prune else "off", count + 1
                    logs = runs.setdefault(row_key(method, optimizer, pruning), [])
                    if len(logs) <= seed:
                        search(logs, space, optimizer, seed, tasks[prune], reduction_factor,
                               study_name(nfe, method, optimizer, prune, seed),
                               f"search {count}/{total} ({method}, {optimizer}, pruning {pruning}, seed {seed})")
        for measured in ("untuned", method):  # the method's rows are final from here on
            measure_spread(measured)
        for variant_rungs, factor, *_ in variants:
            key = variant_key(variant_rungs, factor)
            if method not in results["plan"]["variants"][key]["methods"]:
                continue
            task = Task(model=model, nfe=nfe, n=n, rungs=tuple(variant_rungs))
            for seed in range(seeds):
                for optimizer in results["plan"]["variants"][key]["optimizers"]:
                    extra_count += 1
                    logs = by_variant.setdefault(row_key(method, optimizer, key), [])
                    if len(logs) <= seed:
                        search(logs, space, optimizer, seed, task, factor,
                               study_name(nfe, method, optimizer, True, seed, key),
                               f"variant {extra_count}/{extra} ({method}, {optimizer}, "
                               f"{variant_label(variant_rungs, factor)}, seed {seed})")
    return results


def variant_label(rungs, factor: int | str) -> str:
    """A variant's pruning in a progress bar: 'rungs 62,500 rf3', 'wilcoxon on 16 blocks'."""
    return f"wilcoxon on {len(rungs)} blocks" if factor == WILCOXON else f"rungs {','.join(map(str, rungs))} rf{factor}"


def trial_log(study) -> list[dict]:
    """Each trial of a finished search: its value (None when pruned or failed), the samples it
    spent (none for a repeated proposal), its parameters, and a warm start's mark (``open_study``)."""
    return [{"value": t.value if t.state.name == "COMPLETE" else None,
             "samples": 0 if "same_as" in t.user_attrs else (t.last_step or 0), "params": t.params,
             **({"warm_start": t.user_attrs["warm_start"]} if t.user_attrs.get("warm_start") else {})}
            for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def reference_best(results: dict, method: str) -> dict | None:
    """The best completed trial of any of ``method``'s searches: the target's anchor."""
    done = [t for key, logs in results.get("runs", {}).items() if row_of(key)[0] == method
            for log in logs for t in log["trials"] if t["value"] is not None]
    return min(done, key=lambda t: t["value"]) if done else None


def target_of(results: dict, method: str) -> tuple[float, float] | None:
    """(reference best, target) of ``method``: None until its spread is measured."""
    spread, best = results.get("spread", {}), reference_best(results, method)
    if best is None or method not in spread:
        return None
    return best["value"], best["value"] + statistics.median(spread[m]["std"] for m in ("untuned", method) if m in spread)


def reach_summary(logs: list[dict], target: float) -> dict:
    """Of one row's searches (a log per search seed): how many reached ``target``, the median trials
    and samples to it (over those that did), each seed's samples to it and best FID, and the CPU time."""
    reached = [_reach(log["trials"], target) for log in logs]
    hit = [r for r in reached if r[0] is not None]
    return {"seeds": len(logs), "reached": len(hit),
            "bests": [min((t["value"] for t in log["trials"] if t["value"] is not None), default=None) for log in logs],
            "median_trials": statistics.median(r[0] for r in hit) if hit else None,
            "median_samples": statistics.median(r[1] for r in hit) if hit else None,
            "samples_to_target": [r[1] for r in reached],
            "cpu_seconds": sum(log.get("cpu_seconds", 0) for log in logs)}


def cost_rows(results: dict) -> list[dict]:
    """Per method, optimizer and pruning: search seeds reaching the target, median trials and samples
    to it (over those that did), and the samples to it seed by seed (for the saving of pruning)."""
    rows = []
    for key, logs in results.get("runs", {}).items():
        method, optimizer, prune = row_of(key)
        if logs and (row := summary_row(results, method, optimizer, prune == "on", logs)):
            rows.append(row)
    return rows


def summary_row(results: dict, method: str, optimizer: str, pruning: bool, logs: list[dict]) -> dict | None:
    """A row of ``method``'s searches (``logs``) against its target (``reach_summary``), with the
    target and its anchor; None until the method's spread is measured."""
    if (anchor := target_of(results, method)) is None:
        return None
    return {"method": method, "optimizer": optimizer, "pruning": pruning, "best": anchor[0], "target": anchor[1],
            **reach_summary(logs, anchor[1])}


def variant_lines(results: dict) -> list[str]:
    """The pruning variants' rows: each beside the same optimizer's searches without pruning."""
    lines, before = [], before_key(results["settings"]["n"])
    for key, logs in results.get("variants", {}).items():
        method, optimizer, pruning = row_of(key)
        off = results.get("runs", {}).get(row_key(method, optimizer, "off"), [])
        if len(logs) < results["plan"]["seeds"] or (row := summary_row(results, method, optimizer, True, logs)) is None:
            continue  # a row once every search seed is done
        without = reach_summary(off, row["target"])
        cut = pruning_saving(row["samples_to_target"], without["samples_to_target"])
        rungs, factor = variant_pruning(pruning)
        mark = " (the search before issue 27)" if pruning == before else ""
        shown = "" if factor == WILCOXON else f"{','.join(map(str, rungs))}: "  # 16 rungs: the text says them
        lines.append(f"| {method} | {optimizer} | {shown}{variant_text(rungs, factor)}{mark} | "
                     f"{row['reached']}/{row['seeds']} | {fmt(row['median_trials'], 'g')} | "
                     f"{fmt(row['median_samples'], ',.0f')} | "
                     f"{f'{cut[0]:.0f}% ({cut[1]} seed' + 's' * (cut[1] > 1) + ')' if cut else '–'} |")
    if not lines:
        return []
    plan = results["plan"]
    only = [f"{variant_text(*variant_pruning(key))} on {', '.join(v['methods'])} only"
            for key, v in plan.get("variants", {}).items() if set(v["methods"]) != set(plan["methods"])]
    return ["", "Pruning variants: the same searches with another pruning, against the same target; samples saved "
                "vs the same optimizer and search seed without pruning" + (f" ({'; '.join(only)})" if only else "")
            + ".", "",
            "| method | optimizer | pruning | seeds reaching | median trials | median samples | samples saved |",
            "| --- | --- | --- | :---: | ---: | ---: | ---: |", *lines]


def versus_before(results: dict, row: dict) -> tuple[str, str | None]:
    """``row``'s (a method's optimizer with its pruning) median samples to target beside the search
    before issue 27's (``before_key``), '3,306 (3/3 seeds) against 4,000 (3/3): fewer', and the
    verdict: 'fewer', 'not fewer', 'at fewer search seeds', or None where there is none (that search
    without every search seed yet, or never reaching the target); ('', None) where ``row`` never did."""
    logs = results.get("variants", {}).get(row_key(row["method"], "tpe", before_key(results["settings"]["n"])), [])
    if row["median_samples"] is None:
        return "", None
    mine = f"{row['median_samples']:,.0f} ({row['reached']}/{row['seeds']} seeds)"
    if len(logs) < results["plan"]["seeds"]:
        return mine, None
    old = reach_summary(logs, row["target"])
    if old["median_samples"] is None:
        return f"{mine}; the search before issue 27 reached the target at no search seed", None
    word = ("at fewer search seeds" if row["reached"] < old["reached"]
            else "fewer" if row["median_samples"] < old["median_samples"] else "not fewer")
    return f"{mine} against {old['median_samples']:,.0f} ({old['reached']}/{old['seeds']}): {word}", word


def own_variant(results: dict, optimizer: str) -> str | None:
    """The variant key of the rows searched with the pruning the tool gives ``optimizer``
    (``default_reduction_factor``): the protocol's rungs with its factor; None where the main rows
    hold them (the protocol's factor, pruning on; none, pruning off)."""
    s = with_legacy_factor(results["settings"])
    factor = default_reduction_factor(optimizer)
    return None if factor in (s["reduction_factor"], NO_PRUNING) else variant_key(s["rungs"], factor)


def own_pruning_planned(results: dict, method: str, optimizer: str) -> bool:
    """Whether the plan searches ``method`` with ``optimizer`` under the pruning the tool gives it
    (``own_variant``): the main rows always, a variant where the plan has it for both."""
    if (key := own_variant(results, optimizer)) is None:
        return True
    variant = results["plan"].get("variants", {}).get(key, {})
    return method in variant.get("methods", ()) and optimizer in variant.get("optimizers", ())


def default_pruning_row(results: dict, method: str, optimizer: str, by_key: dict) -> dict | None:
    """``method``'s row of ``optimizer`` with the pruning the tool searches with it (``own_variant``:
    a main row, or a variant's, TPE's a third at 62); None until it has every seed."""
    seeds = results["plan"]["seeds"]
    if (key := own_variant(results, optimizer)) is None:
        row = by_key.get((method, optimizer, default_reduction_factor(optimizer) != NO_PRUNING))
        return row if row and row["seeds"] >= seeds else None
    logs = results.get("variants", {}).get(row_key(method, optimizer, key), [])
    return summary_row(results, method, optimizer, True, logs) if len(logs) >= seeds else None


def pick_of(results: dict, rows: list[dict]) -> dict:
    """The default optimizer's row among a method's ``rows`` (each reaching the target at the same,
    largest share of search seeds): the one meeting more of issue 27's targets (median trials within ``TRIAL_TARGETS``,
    fewer samples than the search before issue 27, ``versus_before``), then of fewest trials, then
    of fewest samples."""
    def met(row: dict) -> int:
        goal = TRIAL_TARGETS.get(row["method"])
        return (goal is not None and row["median_trials"] <= goal) + (versus_before(results, row)[1] == "fewer")

    return min(rows, key=lambda r: (-met(r), r["median_trials"], r["median_samples"]))


def pick_row(results: dict, method: str, by_key: dict) -> tuple[str, dict | None] | None:
    """``method``'s pick among the optimizers the plan searches with their own pruning
    (``own_pruning_planned``), once each has its row (``default_pruning_row``): ('pick', the row
    ``pick_of`` picks among those reaching the target at the largest share of their search seeds),
    or ('none', None) where none reached it at any seed; None while a row is still to come."""
    candidates = [o for o in results["plan"]["optimizers"] if own_pruning_planned(results, method, o)]
    rows = [default_pruning_row(results, method, o, by_key) for o in candidates]
    if not rows or None in rows:
        return None
    def share(row: dict) -> float:  # of its search seeds: a row may hold more than the plan
        return row["reached"] / row["seeds"]

    if not (most := max(map(share, rows))):
        return "none", None
    return "pick", pick_of(results, [r for r in rows if share(r) == most])


def trials_text(row: dict) -> str:
    """``row``'s median trials to target against its method's trial target (``TRIAL_TARGETS``),
    '18 (≤ 10: missed by 8)', and the seeds it stands on where not every one reached the target."""
    goal, trials = TRIAL_TARGETS.get(row["method"]), row["median_trials"]
    if row["reached"] < row["seeds"]:
        return f"{trials:g}, at {row['reached']} of {row['seeds']} search seeds" + (
            "" if goal is None else f" (≤ {goal}: not at every seed)")
    return f"{trials:g}" + ("" if goal is None else f" (≤ {goal}: " + (
        "met)" if trials <= goal else f"missed by {trials - goal:g})"))


def pick_lines(results: dict, by_key: dict) -> list[str]:
    """Issue 27's targets per method: each method's pick (``pick_row``) with its pruning, its trials
    against the trial target, its samples against the search before issue 27, what its pruning saved,
    and the optimizer the tool searches the method with (``default_optimizer``)."""
    s, plan, cells = results["settings"], results["plan"], []
    left_out = {o: pruning_text(s["rungs"], default_reduction_factor(o)) for o in plan["optimizers"]
                if not any(own_pruning_planned(results, m, o) for m in plan["methods"])}
    for method in plan["methods"]:
        if (found := pick_row(results, method, by_key)) is None:
            continue
        kind, row = found
        default = default_optimizer(method.removesuffix("_allsteps"), freeu_window=not method.endswith("_allsteps"))
        if kind == "none":
            cells.append(f"| {method} | none: no optimizer, with its own pruning, reached it at any search seed | "
                         f"– | – | – | – | {default} |")
            continue
        factor = default_reduction_factor(row["optimizer"])
        off = by_key.get((method, row["optimizer"], False))
        cut = pruning_saving(row["samples_to_target"], off["samples_to_target"]) if off and row["pruning"] else None
        saved = ("none: no pruning" if factor == NO_PRUNING
                 else f"{cut[0]:.0f}% ({cut[1]} seed{'s' * (cut[1] > 1)})" if cut else "–")
        cells.append(f"| {method} | {row['optimizer']}, {pruning_text(s['rungs'], factor)} | "
                     f"{row['reached']}/{row['seeds']} | {trials_text(row)} | {versus_before(results, row)[0]} | {saved} | "
                     f"{default} |")
    if not cells:
        return []
    return ["", "Issue 27's targets per method. The pick: among the optimizers that reached the method's target at "
                "the most search seeds, each with the pruning the tool searches with it (the main rows, or the variant "
                "row below where the optimizer's own pruning is not the protocol's), the one meeting more of the "
                "targets (median trials within the method's target; fewer samples to target than the search before "
                "issue 27: TPE, rungs N/4 and N keeping a third), then the one of fewest trials. Samples saved: by "
                "the pick's pruning, against the same optimizer and search seeds without it. The tool's default: "
                "the optimizer a search of the method uses unless told (`DEFAULT_OPTIMIZERS`)."
            + "".join(f" Not a candidate: {o} (the tool searches with it keeping "
                      f"{text.removeprefix('successive halving keeping ')}, which no search here does)."
                      for o, text in left_out.items()), "",
            "| method | pick, its pruning | seeds reaching | median trials (target) | median samples to target, "
            "against the search before issue 27 | samples saved by its pruning | the tool's default |",
            "| --- | --- | :---: | ---: | --- | ---: | --- |", *cells]


def done_rows(results: dict, method: str, by_key: dict) -> list[tuple[str, str, dict]]:
    """``method``'s rows, main and variant, with every search seed done: (optimizer, its pruning in
    words, the row)."""
    s, seeds = results["settings"], results["plan"]["seeds"]
    on = pruning_text(s["rungs"], with_legacy_factor(s)["reduction_factor"])
    rows = [(o, on if p else "no pruning", r) for (m, o, p), r in by_key.items() if m == method and r["seeds"] >= seeds]
    for key, logs in results.get("variants", {}).items():
        m, optimizer, pruning = row_of(key)
        if m == method and len(logs) >= seeds and (row := summary_row(results, m, optimizer, True, logs)):
            rows.append((optimizer, variant_text(*variant_pruning(pruning)), row))
    return rows


def best_searches(rows: list[tuple[str, str, dict]]) -> str:
    """Where no row reached the target at every seed: the row whose searches found the lowest FIDs
    (the lowest median of each seed's best), 'none; lowest: gp, no pruning, its searches' best
    3005, 3040, 3075 against 3038 (median 2 above)'."""
    scored = [(sorted(b for b in r["bests"] if b is not None), o, text, r) for o, text, r in rows]
    if not (scored := [(statistics.median(bests), bests, o, text, r) for bests, o, text, r in scored if bests]):
        return "none"
    median, bests, o, text, row = min(scored, key=lambda f: f[0])
    return (f"none; lowest: {o}, {text}, its searches' best {', '.join(f'{b:.0f}' for b in bests)} against "
            f"{row['target']:.0f} (median {abs(median - row['target']):.0f} "
            f"{'above' if median > row['target'] else 'below'})")


def pruning_cost(row: dict, by_key: dict) -> tuple[int, float] | None:
    """What ``row``'s pruning saved against the same optimizer without it (``pruning_saving``, in
    whole %), with that row's median trials; None where that row lacks a search seed of ``row``'s
    or ``row`` reached the target at fewer seeds than it."""
    off = by_key.get((row["method"], row["optimizer"], False))
    if (not off or off["seeds"] < row["seeds"] or row["reached"] < off["reached"]
            or not (cut := pruning_saving(row["samples_to_target"], off["samples_to_target"]))):
        return None
    return round(cut[0]), off["median_trials"]


def random_hits(results: dict, method: str, target: float) -> str:
    """How small a part of the space ``method``'s target is: of random's proposals without pruning
    (its queued first trials, the same at every search seed, left out), how many scored at or below
    ``target``."""
    logs = [log["trials"] for log in results.get("runs", {}).get(row_key(method, "random", "off"), [])]
    if len(logs) < 2:  # one seed cannot tell the queued trials from the proposals
        return "–"
    queued = 0
    while all(len(t) > queued for t in logs) and len({json.dumps(t[queued]["params"], sort_keys=True)
                                                      for t in logs}) == 1:
        queued += 1
    values = [t["value"] for trials in logs for t in trials[queued:] if t["value"] is not None]
    return f"{sum(v <= target for v in values)} of {len(values)}"


def nearest_lines(results: dict, by_key: dict) -> list[str]:
    """How near issue 27's targets any search here came, per decided method (``pick_row``): how many
    of random's proposals reached the target (``random_hits``); the pick's trials beside the fewest
    of any row reaching the target at every seed (``done_rows``), or where none did the row whose
    searches found the lowest FIDs (``best_searches``); what the pick's pruning saved beside the
    most any pruning saved at every seed in no more trials than without it (``pruning_cost``).
    Where both fall short, nothing measured here meets the target."""
    cells = []
    for method in results["plan"]["methods"]:
        if not (found := pick_row(results, method, by_key)):
            continue
        pick, done = found[1], done_rows(results, method, by_key)
        full = [(o, text, r) for o, text, r in done if r["reached"] == r["seeds"]]
        if full:
            o, text, fewest = min(full, key=lambda f: (f[2]["median_trials"], f[2]["median_samples"]))
            nearest = f"{fewest['median_trials']:g}: {o}, {text}"
        else:
            nearest = best_searches(done)
        target = done[0][2]["target"]
        if pick is None:
            mine = "–"
        elif not pick["pruning"]:
            mine = f"none: {pick['optimizer']} searches without pruning"
        elif (own := pruning_cost(pick, by_key)) is None:
            mine = "–"
        else:
            fewer = pick["median_trials"] <= own[1]
            verdict = ("met" if own[0] >= PRUNING_TARGET and fewer
                       else f"short by {PRUNING_TARGET - own[0]} points" if fewer else "in more trials")
            mine = (f"{own[0]}% (≥ {PRUNING_TARGET}%: {verdict}); {pick['median_trials']:g} trials against "
                    f"{own[1]:g} without" + (f", at {pick['reached']} of {pick['seeds']} search seeds"
                                             if pick["reached"] < pick["seeds"] else ""))
        saving = [(cost[0], o2, text2) for o2, text2, r in full if r["pruning"]
                  and (cost := pruning_cost(r, by_key)) and r["median_trials"] <= cost[1]]
        most = max(saving, key=lambda c: c[0], default=None)
        cells.append(f"| {method} | {random_hits(results, method, target)} | "
                     f"{trials_text(pick) if pick else 'none reached it'} | {nearest} | {mine} | "
                     + (f"{most[0]}%: {most[1]}, {most[2]} |" if most else
                        "none: no pruning here reached the target at every seed in no more trials than without |"))
    if not cells:
        return []
    return ["", "How near issue 27's targets any search here came, per method: how many of random's proposals "
                "(without pruning; its queued first trials left out) scored at or below the target, that is how "
                "small a part of the space the target is; the pick's median trials beside the fewest of any "
                "optimizer and pruning above that reached the target at every search seed (where none did, the "
                "one whose searches' best FIDs have the lowest median); what the pick's pruning "
                "saved (item 3: at least half, in no more trials than without it) beside the most any pruning above "
                "saved while reaching the target at every seed in no more median trials than the same optimizer "
                "without pruning. Where the nearest falls short too, no optimizer and pruning measured here meets "
                "that target on this problem.", "",
            "| method | random's proposals at or below the target | the pick's median trials (target) | fewest median "
            "trials at every seed | samples saved by the pick's pruning (target); its trials | most saved by any "
            "pruning at every seed, in no more trials |",
            "| --- | ---: | ---: | --- | --- | --- |", *cells]


def missing_searches(results: dict) -> list[str]:
    """The plan's rows, main and variant, with a search seed still to search: 'freeu tpe pruning off
    (2 of 3 seeds)'."""
    plan, runs, missing = results["plan"], results.get("runs", {}), []
    for method in plan["methods"]:
        for optimizer in plan["optimizers"]:
            for label in ("on", "off"):
                if (done := len(runs.get(row_key(method, optimizer, label), []))) < plan["seeds"]:
                    missing.append(f"{method} {optimizer} pruning {label} ({done} of {plan['seeds']} seeds)")
    for key, variant in plan.get("variants", {}).items():
        for method in variant["methods"]:
            for optimizer in variant["optimizers"]:
                if (done := len(results.get("variants", {}).get(row_key(method, optimizer, key), []))) < plan["seeds"]:
                    missing.append(f"{method} {optimizer} {variant_text(*variant_pruning(key))} "
                                   f"({done} of {plan['seeds']} seeds)")
    return missing


def render(results: dict) -> list[str]:
    """The per-family part of table 4: the protocol, a row per method and optimizer, the saving of
    pruning, which optimizer each method's target picks, and what is not measured yet."""
    s, plan = results["settings"], results["plan"]
    rows = cost_rows(results)
    by_key = {(r["method"], r["optimizer"], r["pruning"]): r for r in rows}
    every = [*results.get("runs", {}).values(), *results.get("variants", {}).values()]
    missing = missing_searches(results)
    cpu_h = (sum(log.get("cpu_seconds", 0) for logs in every for log in logs)
             + sum(results.get("partial", {}).values())) / 3600  # and the search under way, up to its last score
    lines = [f"Written by `{results['command']}` on {results['date']}. Machine: {'; '.join(results['machines'])}.", "",
             f"Protocol (a cheaper one than the grid's, so that every family fits about 20 CPU-hours): model "
             f"{s['model']}, Heun NFE {s['nfe']}, Karras σ, N = {s['n']} (rungs {','.join(map(str, s['rungs']))}, "
             f"{pruning_text(s['rungs'], with_legacy_factor(s)['reduction_factor'])}, CMA-ES counting a pruned trial "
             f"toward its generation at its rung's FID; pruning off: N only), "
             f"{s['trials']} trials per search, search seeds 0-{plan['seeds'] - 1}, each method's default space (input placement, ρ in [0.5, 1.5], per_noise on 3 "
             f"σ knots, FreeU's window over the sampler's model calls). Target: the method's reference best (the "
             f"best N-sample FID of all its searches here) plus the proxy's seed-to-seed spread (std of FID at N over "
             f"{s['blocks']} blocks of N held-out samples, median of the untuned model's and the reference best's). "
             f"Trials and samples to target: medians over the search seeds that reached it. "
             f"{'Searches so far' if missing else 'The searches'} took {cpu_h:.1f} CPU-hours (process time).", "",
             "| method | optimizer | target (best + spread) | seeds reaching, pruning on / off | median trials on / off "
             "| median samples on / off | samples saved by pruning |",
             "| --- | --- | ---: | :---: | ---: | ---: | ---: |"]
    for method in plan["methods"]:
        for optimizer in plan["optimizers"]:
            on, off = by_key.get((method, optimizer, True)), by_key.get((method, optimizer, False))
            if not on or not off:
                continue
            cut = pruning_saving(on["samples_to_target"], off["samples_to_target"])
            saved = f"{cut[0]:.0f}% ({cut[1]} seed{'s' * (cut[1] > 1)})" if cut else "–"
            lines.append(f"| {method} | {optimizer} | {on['target']:.4g} ({on['best']:.4g} + "
                         f"{on['target'] - on['best']:.3g}) | {on['reached']}/{on['seeds']} / {off['reached']}/"
                         f"{off['seeds']} | {fmt(on['median_trials'], 'g')} / {fmt(off['median_trials'], 'g')} | "
                         f"{fmt(on['median_samples'], ',.0f')} / {fmt(off['median_samples'], ',.0f')} | {saved} |")
    lines += pick_lines(results, by_key)
    lines += nearest_lines(results, by_key)
    lines += variant_lines(results)
    if missing:
        lines += ["", f"Not measured yet (rerun the same command to go on): {', '.join(missing)}."]
    return lines
