"""Benchmarks of the search itself (BENCHMARKS.md tables 3 and 4).

Table 4, search efficiency: an exhaustive grid of the ``linear`` family (ρ_inner × ρ_outer) on the
default task is the ground truth; each optimizer is then replayed on the same grid (its trials
answered from the grid's table, rungs and pruning as in a real search) for several search seeds.

Table 3, proxy fidelity: for schedules drawn from the grid (random points and points the TPE
replays found), does each proxy objective (FID at each rung, FID∞, KID, all on the search's
seeds) rank them like FID on many held-out samples? And how much does each proxy move from one
block of seeds to another?

Sampling is the whole cost, so every evaluated point is written to a JSON file as soon as it
is done: an interrupted run resumes where it stopped, and the tables render from whatever
the file holds.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path

from importlib.metadata import version

from ..core.errors import InputError, InputFileError
from ..core.files import read_json, write_text_atomic
from ..core.schedule import RhoSchedule, SkipInfo
from ..models.loaders import weights_fingerprint
from ..scoring.evaluator import Evaluator, Rung, rung_score
from ..scoring.metrics import fid_inf
from ..scoring.objectives import proxy_names
from ..search.objective import Objective
from ..search.optimizers import LEGACY_REDUCTION_FACTOR
from ..search.space import Space, grid_values
from ..search.study import memory_study

HELD_OUT_SEED = 2_000_000  # held-out samples of table 3: far from the search's and evaluate's seeds


# --- the results file: one JSON per table, rewritten atomically after each evaluated point --------
def load_results(path: Path) -> dict:
    if not Path(path).exists():
        return {}
    results = read_json(path, "benchmark results", max_bytes=256 << 20, option="work")
    if not isinstance(results, dict):
        raise InputFileError(f"benchmark results {path} hold no JSON object; move the file away to measure again",
                             option="work")
    return results


def save_results(path: Path, results: dict) -> None:
    write_text_atomic(path, json.dumps(results, indent=1) + "\n")


def point_key(inner: float, outer: float) -> str:
    return f"{inner:g},{outer:g}"


def _scores(rungs: list[Rung]) -> dict:
    """FID and KID at each rung, and FID∞ over the rungs, as the results files keep them."""
    out = {"fid": {str(r.n): r.fid for r in rungs}}
    if rungs[0].kid is not None:
        out["kid"] = {str(r.n): r.kid for r in rungs}
    if len(rungs) > 1:
        out["fid_inf"] = fid_inf([r.n for r in rungs], [r.fid for r in rungs])
    for name in rungs[0].values:  # an objective's own metric (Objective.measure)
        out[name] = {str(r.n): r.values[name] for r in rungs}
    return out


def settings_differences(old: dict | None, new: dict) -> list[str]:
    """What keeps results saved under ``old`` settings from being extended under ``new`` ones, as
    'name: old (now new)': every setting both name must be equal (a setting added to the tool since,
    such as the weights' fingerprint, was not recorded, so it is not compared)."""
    if old is None:
        return []
    new = json.loads(json.dumps(new))
    old_task, new_task = old.get("task", {}), new.get("task", {})
    return ([f"{k}: {old_task[k]} (now {v})" for k, v in new_task.items() if k in old_task and old_task[k] != v]
            + [f"{k}: {old[k]} (now {v})" for k, v in new.items() if k != "task" and k in old and old[k] != v])


def with_legacy_factor(settings: dict | None) -> dict | None:
    """A results file's settings with the successive halving factor of its searches: one from before
    the factor was recorded ran with the factor of then (``LEGACY_REDUCTION_FACTOR``)."""
    return None if settings is None else {"reduction_factor": LEGACY_REDUCTION_FACTOR, **settings}


def same_settings(old: dict | None, new: dict) -> bool:
    """Results under ``old`` settings are of ``new`` ones: there are some, and ``settings_differences`` finds none."""
    return old is not None and not settings_differences(old, new)


def check_same_settings(path: Path, what: str, old: dict | None, new: dict) -> None:
    """A one-line error naming the settings that differ, when ``path`` holds ``what`` of others."""
    if differences := settings_differences(old, new):
        raise InputError(f"{path} holds {what} of other settings ({'; '.join(differences)}); rerun with those, or "
                         f"use another folder (the results there stay as they are)", option="work")


def stamp_run(results: dict, settings: dict, command: str, machine: str) -> None:
    """Stamp a results file that this run extends: its settings, this command and date, and this
    machine added to those that measured its earlier parts."""
    machines = results.get("machines") or ([results["machine"]] if "machine" in results else [])
    results.update(settings=settings, command=command, machine=machine, date=time.strftime("%Y-%m-%d"),
                   machines=machines + [machine] * (machine not in machines))


def fmt(v, spec: str = ".4g") -> str:
    """A table cell: ``v`` in ``spec``, or – where there is none."""
    return "–" if v is None else format(v, spec)


def pruning_saving(with_pruning: list, without: list) -> tuple[float, int] | None:
    """Samples to target with pruning vs without (or warm-started vs cold), search seed by search
    seed (both searches of a seed start alike): the median share saved, in %, and the seeds that
    got there both ways."""
    pairs = [(a, b) for a, b in zip(with_pruning, without) if a is not None and b is not None]
    return (100 * statistics.median(1 - a / b for a, b in pairs), len(pairs)) if pairs else None


# --- table 4, part 1: the exhaustive grid -------------------------------------------------------
def run_grid(evaluator: Evaluator, path: Path, points: int, command: str, machine: str,
             progress: bool = True, low_rungs: tuple[int, ...] = ()) -> dict:
    """Evaluate every (ρ_inner, ρ_outer) of a ``points`` × ``points`` grid on the task's seeds,
    in a seeded random order (a partial grid is still an even sample of it); then, once the grid
    is whole, each point's FID on its first samples at each of ``low_rungs`` (sample counts below
    the task's first rung: what replays of a cheaper first rung look up)."""
    task = evaluator.task
    results = load_results(path)
    settings = {"task": task.scoring_key(), "points": points, "placement": Space().placement,
                "weights": weights_fingerprint(evaluator.controller.unet)}
    check_same_settings(path, "a grid", results.get("settings"), settings)
    grid = results.setdefault("grid", {})
    values = grid_values(points)
    order = [(i, o) for i in values for o in values]
    random.Random(0).shuffle(order)
    ctl = evaluator.controller
    todo = [(i, o) for i, o in order if point_key(i, o) not in grid]
    if todo:  # the grid's header names the run that finished it, and every machine that measured part
        stamp_run(results, settings, command, machine)
    for k, (inner, outer) in enumerate(todo):
        schedule = Space().schedule(ctl.arch, ctl.skips, {"rho_inner": inner, "rho_outer": outer})
        label = progress and f"grid {len(grid) + 1}/{points * points} ρ=({inner:g},{outer:g})"
        grid[point_key(inner, outer)] = _scores(list(evaluator.score(schedule, progress=label)))
        save_results(path, results)
    low = tuple(r for r in low_rungs if r < task.rungs[0])
    lacking = [(i, o) for i, o in order if any(str(r) not in grid[point_key(i, o)]["fid"] for r in low)]
    for k, (inner, outer) in enumerate(lacking):  # the same seeds' first samples: FID at N = r, as a rung scores
        schedule = Space().schedule(ctl.arch, ctl.skips, {"rho_inner": inner, "rho_outer": outer})
        label = progress and f"grid low rungs {k + 1}/{len(lacking)} ρ=({inner:g},{outer:g})"
        for rung in evaluator.score(schedule, rungs=low, progress=label, kid=False):
            grid[point_key(inner, outer)]["fid"][str(rung.n)] = rung.fid
        save_results(path, results)
    return results


# --- table 4, part 2: optimizers replayed on the grid ---------------------------------------------
class GridScorer:
    """Scores of the linear family's schedules looked up in the exhaustive grid instead of sampled:
    what lets table 4 replay a search, through the search's own objective, in seconds."""

    def __init__(self, grid: dict, rungs: tuple[int, ...]) -> None:
        self.grid, self.rungs = grid, rungs

    def score(self, schedule: RhoSchedule, progress: bool | str = False):
        p = schedule.params
        fids = self.grid[point_key(round(p["rho_inner"], 6), round(p["rho_outer"], 6))]["fid"]
        for rung in self.rungs:
            yield Rung(rung, fids[str(rung)])


# two stand-in skips: the lookup needs only the linear family's two parameters, not a real layout
_LINEAR_PAIR = [SkipInfo("outer", "", 1, 2), SkipInfo("inner", "", 1, 1)]


def replay_search(grid: dict, points: int, rungs: tuple[int, ...], optimizer: str, seed: int, trials: int,
                  reduction_factor: int | None, min_resource: int | None = None) -> list[dict]:
    """One search of ``trials`` trials whose ρ are restricted to the grid and whose scores are
    looked up in it, run by the search's own objective, first trials and pruner (successive halving
    by ``reduction_factor`` at ``rungs``, from ``min_resource``: ``make_pruner``; None: no pruning,
    N samples only) on an in-memory study. Returns each trial's point, score (None when pruned) and
    samples spent (none for a proposal of a point already scored, which the objective records
    without sampling)."""
    values = grid_values(points)
    space = Space(step=round(values[1] - values[0], 6))
    if reduction_factor:
        study = memory_study(space, _LINEAR_PAIR, optimizer, seed, rungs, reduction_factor, min_resource)
    else:
        rungs = rungs[-1:]
        study = memory_study(space, _LINEAR_PAIR, optimizer, seed, rungs)
    objective = Objective(GridScorer(grid, rungs), space, "grid", _LINEAR_PAIR, rungs)
    study.optimize(objective, n_trials=trials)
    return [{"point": point_key(round(t.params["rho_inner"], 6), round(t.params["rho_outer"], 6)),
             "value": t.value if t.state.name == "COMPLETE" else None,
             "samples": 0 if "same_as" in t.user_attrs else t.last_step}  # a repeat is not sampled again
            for t in study.get_trials(deepcopy=False)]


def _reach(log: list[dict], target: float) -> tuple[int | None, int | None]:
    """Trials and samples spent until a completed trial scores ≤ ``target``."""
    samples = 0
    for k, t in enumerate(log):
        samples += t["samples"]
        if t["value"] is not None and t["value"] <= target:
            return k + 1, samples
    return None, None


def pruning_key(rungs: tuple[int, ...], reduction_factor: int, min_resource: int | None = None) -> str:
    """A replayed pruning, as the replays' keys name it: '125-1000,rf8' (',from62': checked from 62
    samples on, not from the first rung)."""
    return "-".join(map(str, rungs)) + f",rf{reduction_factor}" + (f",from{min_resource}" if min_resource else "")


def replays(results: dict, optimizers: tuple[str, ...], seeds: int, trials: int, path: Path | None = None,
            pruners: tuple[tuple, ...] = ()) -> dict:
    """Each optimizer's replays on the grid, search seeds 0 to ``seeds`` - 1: without pruning, keyed
    'optimizer,off', and with each of ``pruners`` ((rungs, reduction factor) or (rungs, reduction
    factor, min_resource), at rungs the grid holds FID at), keyed 'optimizer,on,' + ``pruning_key``.
    They are deterministic but slow (a GP replay takes seconds), so with ``path`` they are saved
    there with the grid, the Optuna version and the search code they ran on, and reused while all
    stay the same (a replay of more seeds adds the seeds missing): a change to the objective, the
    first trials or the optimizers reruns them."""
    grid, points = results["grid"], results["settings"]["points"]
    digest = hashlib.sha256(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:16]
    settings = {"grid": digest, "optuna": version("optuna"), "trials": trials, "search_code": search_code_digest()}
    saved = load_results(path) if path else {}
    runs = saved["runs"] if saved.get("settings") == settings else {}
    rungs = tuple(results["settings"]["task"]["rungs"])
    variants = {"on," + pruning_key(*p): p for p in pruners} | {"off": (rungs, None)}
    for optimizer in optimizers:
        for label, (variant_rungs, *pruning) in variants.items():
            logs = runs.setdefault(f"{optimizer},{label}", [])
            for s in range(len(logs), seeds):  # deterministic: seed s replays alike whatever the others
                logs.append(replay_search(grid, points, tuple(variant_rungs), optimizer, s, trials, *pruning))
                if path:
                    save_results(path, {"settings": settings, "runs": runs})
    return {f"{o},{label}": runs[f"{o},{label}"][:seeds] for o in optimizers for label in variants}


def search_code_digest() -> str:
    """16 hex digits of the code of what a replay runs: the trial objective, the search space
    (first trials included), the optimizers and the study helpers; their syntax trees without
    docstrings, so that an edit to a comment or a docstring reruns nothing."""
    import ast
    import inspect

    from ..search import objective, optimizers, space, study

    trees = [ast.parse(inspect.getsource(m)) for m in (objective, optimizers, space, study)]
    for node in (n for tree in trees for n in ast.walk(tree)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256("".join(ast.dump(tree) for tree in trees).encode()).hexdigest()[:16]


def search_efficiency(results: dict, runs: dict, default_trials: int = 16) -> list[dict]:
    """Per optimizer, without pruning and with each pruner (``runs`` from :func:`replays`; a row's
    ``pruner``: its ``pruning_key``): median trials and samples to come within 1% of the grid's
    best, how many seeds got there, and the median best after ``default_trials`` trials."""
    n = str(results["settings"]["task"]["rungs"][-1])
    target = 1.01 * min(r["fid"][n] for r in results["grid"].values())
    rows = []
    for key, logs in runs.items():
        optimizer, prune, *pruning = key.split(",")
        reached = [_reach(log, target) for log in logs]
        hit = [r for r in reached if r[0] is not None]
        at_default = [min((t["value"] for t in log[:default_trials] if t["value"] is not None), default=None)
                      for log in logs]
        rows.append({
            "optimizer": optimizer, "pruning": prune == "on", "pruner": ",".join(pruning) or None,
            "seeds": len(logs), "reached": len(hit),
            "median_trials": statistics.median(r[0] for r in hit) if hit else None,
            "median_samples": statistics.median(r[1] for r in hit) if hit else None,
            "samples_to_target": [r[1] for r in reached],  # per search seed; None where it never got there
            "median_best_at_default": statistics.median(v for v in at_default if v is not None),
            "median_samples_at_default": statistics.median(sum(t["samples"] for t in log[:default_trials])
                                                           for log in logs),
        })
    return rows


# --- table 3: proxy fidelity ------------------------------------------------------------------
def pick_schedules(results: dict, tpe_logs: list[list[dict]], count: int, seed: int = 0) -> list[str]:
    """``count`` grid points: the baseline, the best distinct points the TPE replays completed
    (half of the set), and the rest drawn at random from the grid."""
    grid = results["grid"]
    n = str(results["settings"]["task"]["rungs"][-1])
    chosen = [point_key(1.0, 1.0)]
    found = sorted({t["point"] for log in tpe_logs for t in log if t["value"] is not None},
                   key=lambda p: grid[p]["fid"][n])
    for p in found:
        if len(chosen) >= count // 2:
            break
        if p not in chosen:
            chosen.append(p)
    rest = [p for p in sorted(grid) if p not in chosen]
    random.Random(seed).shuffle(rest)
    return chosen + rest[: count - len(chosen)]


def run_truth(evaluator: Evaluator, path: Path, keys: list[str], truth_n: int, command: str, machine: str,
              progress: bool = True) -> dict:
    """FID of each schedule on ``truth_n`` held-out samples, plus every proxy computed on each
    block of N (the task's samples per trial) of them: the seed-to-seed spread of the proxies."""
    task = evaluator.task
    if truth_n < 2 * task.n or truth_n % task.n:
        raise InputError(f"{truth_n} held-out samples must be a multiple of N = {task.n}, at least twice it",
                         option="truth_n")
    results = load_results(path)
    settings = {"task": task.scoring_key(), "truth_n": truth_n, "held_out_seed": HELD_OUT_SEED,
                "weights": weights_fingerprint(evaluator.controller.unet)}
    check_same_settings(path, "held-out results", results.get("settings"), settings)
    truth = results.setdefault("truth", {})
    if any(k not in truth for k in keys):
        stamp_run(results, settings, command, machine)
    ctl = evaluator.controller
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + truth_n))
    for k, key in enumerate(keys):
        if key in truth:
            continue
        inner, outer = (float(v) for v in key.split(","))
        schedule = Space().schedule(ctl.arch, ctl.skips, {"rho_inner": inner, "rho_outer": outer})
        pooled = next(evaluator.score(schedule, rungs=(truth_n,), seeds=seeds,
                                      progress=progress and f"held-out {k + 1}/{len(keys)} ρ=({key})", kid=False))
        # every proxy on each block of N held-out samples, as a search would score that block
        blocks = [_scores([rung_score(pooled.features[b:b + r], evaluator.reference) for r in task.rungs])
                  for b in range(0, truth_n, task.n)]
        truth[key] = {"fid": pooled.fid, "blocks": blocks}
        save_results(path, results)
    return results


def _proxy(scores: dict, name: str) -> float | None:
    """A proxy's value in a results entry: ``NAME@N`` at rung N, else over all rungs (``fid_inf``)."""
    if "@" not in name:
        return scores.get(name)
    kind, rung = name.split("@")
    return scores.get(kind, {}).get(rung)


def proxy_fidelity(grid: dict, truth: dict, rungs: tuple[int, ...], keys: list[str]) -> list[dict]:
    """Spearman ρ of each proxy (on the search's seeds) vs held-out FID, over all ``keys`` and over
    their better half; and each proxy's seed-to-seed spread (std over held-out blocks, median over
    schedules) next to its spread across schedules."""
    from scipy.stats import spearmanr

    keys = [k for k in keys if k in truth]
    names = proxy_names(rungs)  # each registered objective, at each rung or over them
    rows = []
    good = sorted(keys, key=lambda k: truth[k]["fid"])[: max(3, len(keys) // 2)]
    for name in names:
        vals = [_proxy(grid[k], name) for k in keys]
        if any(v is None for v in vals):
            continue
        rho_all = spearmanr(vals, [truth[k]["fid"] for k in keys]).statistic if len(keys) > 2 else float("nan")
        good_vals = [_proxy(grid[k], name) for k in good]
        rho_good = spearmanr(good_vals, [truth[k]["fid"] for k in good]).statistic if len(good) > 2 else float("nan")
        # the same proxy on each held-out block of N samples
        spreads = []
        for k in keys:
            per_block = [_proxy(b, name) for b in truth[k]["blocks"]]
            if len(per_block) > 1 and None not in per_block:
                spreads.append(statistics.stdev(per_block))
        rows.append({"proxy": name, "spearman": float(rho_all), "spearman_better_half": float(rho_good),
                     "seed_spread": statistics.median(spreads) if spreads else None,
                     "schedule_spread": statistics.stdev(vals) if len(vals) > 1 else None,
                     "schedules": len(keys), "better_half": len(good)})
    return rows
