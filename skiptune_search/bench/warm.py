"""What a warm start saves (BENCHMARKS.md table 4, third part).

Table 5 searched each ρ family at each NFE on its own (no warm start): a cold search per family,
NFE and search seed. Here table 5's NFE 5 searches run again, each warm-started from the best
trial of table 5's NFE 9 search of the same family and search seed, and are compared with table
5's own NFE 5 search of that family and seed: the trials and samples until the running best
reaches the cold search's final best, and the final bests.

A new study queues as warm starts the bests of every study in its storage that differs from it
only in the NFE (``study.siblings``), so table 5's study file cannot hold the warm searches, nor
may this part's own (``warm.db``) keep the NFE 9 studies of other search seeds: the one NFE 9
study a warm search starts from is copied there from table 5's file (which is only read) while
the warm study is created, and deleted again (``storage.borrowed_study``). Everything else is
table 5's: its task (model, N, rungs), space, trials, optimizer, search seed and pruning. Every
finished search is written to the JSON results file at once: an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..core.errors import InputError
from ..models.loaders import weights_fingerprint
from ..scoring.evaluator import Evaluator
from ..scoring.task import Task
from ..search.objective import run_search
from ..search.optimizers import pruning_text
from ..search.storage import borrowed_study, make_storage
from ..search.study import load_own_study, open_study
from .cost import trial_log
from .headline import method_space, study_name
from .search import (
    _reach, check_same_settings, fmt, load_results, pruning_saving, save_results, stamp_run, with_legacy_factor,
)

SOURCE_NFE, TARGET_NFE = 9, 5  # an NFE 5 search warm-started from NFE 9's best


def warm_name(family: str, seed: int, source: int = SOURCE_NFE, target: int = TARGET_NFE) -> str:
    return f"warm-nfe{target}-from{source}-{family}-seed{seed}"


def table5_run(headline: dict, nfe: int, family: str, seed: int) -> dict | None:
    """Table 5's finished search of ``family`` at ``nfe`` and search seed ``seed`` (None: not run)."""
    runs = headline.get("nfe", {}).get(str(nfe), {}).get(family, [])
    return next((r for r in runs if r["seed"] == seed), None)


def available(headline: dict, seeds: int, source: int = SOURCE_NFE, target: int = TARGET_NFE) -> list[tuple]:
    """(family, search seed) of the warm searches table 5's results allow: both NFEs searched."""
    return [(family, seed) for seed in range(seeds) for family in headline.get("plan", {}).get("families", ())
            if table5_run(headline, source, family, seed) and table5_run(headline, target, family, seed)]


def open_search(storage, name: str, evaluator: Evaluator, space, seed: int, reduction_factor: int):
    """A warm search's study: table 5's task, space and pruning (successive halving at its rungs,
    ``reduction_factor``), the best of its sibling studies queued after the baseline."""
    return open_study(storage, name, evaluator.task, space, evaluator.controller, seed, warm_start=True,
                      reduction_factor=reduction_factor)


def run_warm(headline_path: Path, path: Path, command: str, machine: str, *, seeds: int, batch: int,
             source: int = SOURCE_NFE, target: int = TARGET_NFE, progress: bool = True) -> dict:
    """A warm search per family of table 5 (its results at ``headline_path``, its studies beside
    them) and search seed, seed by seed (every family at seed 0 first), where table 5 searched both
    NFEs; each with table 5's cold search of the same family and seed read beside it."""
    headline = load_results(headline_path)
    s = with_legacy_factor(headline["settings"])
    results = load_results(path)
    evaluator = Evaluator(Task(model=s["model"], nfe=target, n=s["n"], rungs=tuple(s["rungs"])),
                          batch_size=min(batch, s["n"]))
    weights = weights_fingerprint(evaluator.controller.unet)
    if weights != s["weights"]:
        raise InputError(f"{headline_path} holds table 5 measured with other weights of {s['model']} (retrained "
                         f"since?): warm starts compare with its searches only on the same weights; measure table 5 "
                         f"again first", option="work")
    settings = {"model": s["model"], "source_nfe": source, "target_nfe": target, "weights": weights,
                "reduction_factor": s["reduction_factor"], "table5": {k: s[k] for k in ("trials", "n", "rungs")}}
    check_same_settings(path, "warm-start results", results.get("settings"), settings)
    stamp_run(results, settings, command, machine)
    families = list(headline["plan"]["families"])
    results["plan"] = {"families": families, "seeds": seeds}
    runs = results.setdefault("runs", {})
    db = f"sqlite:///{Path(headline_path).with_suffix('.db')}"
    table5 = make_storage(db, heartbeat=None, create=False)
    storage = make_storage(f"sqlite:///{Path(path).with_suffix('.db')}", heartbeat=None)
    kept, plan = {study.study_name for study in table5.get_all_studies()}, []
    lost = results["lost"] = []  # searches table 5's results hold but its study file no longer does
    for family, seed in available(headline, seeds, source, target):
        if any(r["seed"] == seed for r in runs.get(family, [])):
            continue  # measured: its row stands, whatever table 5's study file holds now
        start, cold = table5_run(headline, source, family, seed), table5_run(headline, target, family, seed)
        names = study_name(source, family, seed, "window" in start), study_name(target, family, seed, "window" in cold)
        lost += [{"family": family, "seed": seed, "study": name} for name in names if name not in kept]
        if set(names) <= kept:
            plan.append((family, seed, *names))
    save_results(path, results)
    for family, seed, borrowed, cold_name in plan:
        done = runs.setdefault(family, [])
        if any(r["seed"] == seed for r in done):
            continue
        space = method_space(evaluator, family)
        with borrowed_study(borrowed, table5, storage):
            # table 5's studies predate recorded weights (siblings match on them): its results file
            # records the weights they were searched with, checked above to be these
            copy = storage.get_study_id_from_name(borrowed)
            if "weights" not in storage.get_study_user_attrs(copy):
                storage.set_study_user_attr(copy, "weights", weights)
            study = open_search(storage, warm_name(family, seed, source, target), evaluator, space, seed,
                                s["reduction_factor"])
        run_search(evaluator, study, space, s["trials"], progress=progress)
        cold_study = load_own_study(table5, cold_name, db)
        done.append({"seed": seed, "trials": trial_log(study), "cold": trial_log(cold_study)})
        save_results(path, results)
    return results


def comparison(run: dict) -> dict:
    """One warm search beside its cold one: the final bests, the trials and samples each took to
    reach the cold search's final best (None: not within its trials), and its warm-start trial."""
    warm, cold = run["trials"], run["cold"]
    best = {k: min((t["value"] for t in log if t["value"] is not None), default=None)
            for k, log in (("warm", warm), ("cold", cold))}
    reach = {k: _reach(log, best["cold"]) if best["cold"] is not None else (None, None)
             for k, log in (("warm", warm), ("cold", cold))}
    start = next((k for k, t in enumerate(warm) if t.get("warm_start")), None)
    first_best = next((k for k, t in enumerate(warm) if t["value"] is not None and t["value"] == best["warm"]), None)
    return {"seed": run["seed"], "best": best, "trials": {k: r[0] for k, r in reach.items()},
            "samples": {k: r[1] for k, r in reach.items()},
            "start": None if start is None else {**warm[start]["warm_start"], "at": start,
                                                 "value_here": warm[start]["value"], "best": start == first_best}}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _saved(rows: list[dict]) -> str:
    """The median share of samples to the cold search's best that warm starts saved, seed by seed."""
    cut = pruning_saving([r["samples"]["warm"] for r in rows], [r["samples"]["cold"] for r in rows])
    return "–" if cut is None else f"{cut[0]:.0f}%" + (f" ({cut[1]} seed{'s' * (cut[1] > 1)})" if len(rows) > 1 else "")


def _start(start: dict | None) -> str:
    """The warm-start trial's cell: its number, its FID here (or pruned), and whether it was the best."""
    if start is None:
        return "none queued"
    value = "pruned" if start["value_here"] is None else fmt(start["value_here"])
    return f"trial {start['at'] + 1}: {value}" + (", the best" if start["best"] else "")


def protocol(source: int, target: int, trials: int, n: int, rungs: list, reduction_factor: int, seeds: int) -> str:
    """What the part measures, in words, from table 5's settings."""
    pruning = f"rungs {','.join(map(str, rungs))}, {pruning_text(rungs, reduction_factor)}"
    return (f"Protocol: table 5's NFE {target} searches run again, each warm-started from the best trial of "
            f"table 5's NFE {source} search of the same family and search seed (its parameters carried over, "
            f"queued right after the untuned baseline; none when that best is the untuned model), everything else "
            f"as in table 5: {trials} trials, N = {n} ({pruning}), TPE, search seeds 0-{seeds - 1}. Cold: table "
            f"5's own NFE {target} search of the same family and seed. Reach: the first completed trial scoring at "
            f"or below the cold search's final best; samples as a search spends them (a pruned trial's up to its "
            f"rung, a repeated proposal none), warm and cold counted alike.")


def render(results: dict) -> list[str]:
    """A row per family and search seed, and per family the medians: final bests, trials and samples
    to the cold search's final best, the samples saved, and whether the warm start was the best."""
    s, plan = results["settings"], results["plan"]
    t5 = s["table5"]
    lines = [f"Written by `{results['command']}` on {results['date']}. Machine: {'; '.join(results['machines'])}.", "",
             protocol(s["source_nfe"], s["target_nfe"], t5["trials"], t5["n"], t5["rungs"], s["reduction_factor"],
                      plan["seeds"]), "",
             "| family | search seed | final best, cold / warm | trials to cold's best, cold / warm "
             "| samples to it, cold / warm | samples saved | warm-start trial (FID here) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    missing, lost = [], results.get("lost", [])
    for family in plan["families"]:
        rows = [comparison(r) for r in sorted(results["runs"].get(family, []), key=lambda r: r["seed"])]
        missing += [f"{family} seed {k}" for k in range(plan["seeds"])
                    if k not in {r["seed"] for r in rows} | {g["seed"] for g in lost if g["family"] == family}]
        for r in rows:
            warm = fmt(r["trials"]["warm"], "g") if r["trials"]["warm"] is not None else f"not in {t5['trials']}"
            lines.append(f"| {family} | {r['seed']} | {fmt(r['best']['cold'])} / {fmt(r['best']['warm'])} | "
                         f"{fmt(r['trials']['cold'], 'g')} / {warm} | {fmt(r['samples']['cold'], ',')} / "
                         f"{fmt(r['samples']['warm'], ',')} | {_saved([r])} | {_start(r['start'])} |")
        if len(rows) > 1:  # the warm searches' trials and samples: medians over the seeds that reached
            reached = [r for r in rows if r["trials"]["warm"] is not None]
            best_at_start = sum(bool(r["start"] and r["start"]["best"]) for r in rows)
            lines.append(f"| {family} | median of {len(rows)} | {fmt(_median([r['best']['cold'] for r in rows]))} / "
                         f"{fmt(_median([r['best']['warm'] for r in rows]))} | "
                         f"{fmt(_median([r['trials']['cold'] for r in rows]), 'g')} / "
                         f"{fmt(_median([r['trials']['warm'] for r in reached]), 'g')} "
                         f"({len(reached)} of {len(rows)} reached) | "
                         f"{fmt(_median([r['samples']['cold'] for r in rows]), ',.0f')} / "
                         f"{fmt(_median([r['samples']['warm'] for r in reached]), ',.0f')} | {_saved(rows)} | "
                         f"the best in {best_at_start} of {len(rows)} |")
    if lost:
        lines += ["", f"Not measurable: {', '.join(sorted({g['family'] + ' seed ' + str(g['seed']) for g in lost}))}. "
                      f"Table 5's results list their searches, but its study file no longer holds "
                      f"{', '.join(sorted({g['study'] for g in lost}))}, which a warm search starts from or is "
                      f"compared with."]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (each needs table 5's NFE {s['source_nfe']} and "
                      f"{s['target_nfe']} searches of its family and seed; rerun `--tables 4` to go on)."]
    return lines


def unmeasured(headline: dict, seeds: int, source: int = SOURCE_NFE, target: int = TARGET_NFE) -> list[str]:
    """What the part says before any warm search ran: what it would measure, and what it waits for."""
    if available(headline, seeds, source, target):
        s = headline["settings"]
        return [protocol(source, target, s["trials"], s["n"], s["rungs"],
                         with_legacy_factor(s)["reduction_factor"], seeds), "",
                f"Not measured yet: rerun `--tables 4` (table 5 has the NFE {source} and {target} searches it "
                f"starts from and compares with)."]
    nfes = sorted(int(k) for k in headline.get("nfe", {}))
    there = f"table 5 here has NFE {', '.join(map(str, nfes))}" if nfes else "table 5 is not measured here"
    return [f"Not measured: an NFE {target} search warm-started from NFE {source}'s best of the same family and "
            f"search seed, beside table 5's cold one, needs table 5's studies at NFE {source} and {target} ({there}): "
            f"run --tables 5 first, then table 4 again."]
